#!/usr/bin/env python3
"""Builds the BERT tokenizer fixtures for BiomedCLIPSeg: a WordPiece vocabulary learned from
the medvlsm prompts, and transformers' `BertTokenizer` ids (uncased, accents stripped, 256
tokens, [PAD] 0) for every prompt string in ../shared/data/medvlsm-anns and for edge cases.

The real BiomedBERT vocabulary cannot be downloaded here; a vocabulary built from the prompts
themselves exercises the same algorithm on the same strings (whole words, `##` pieces, [UNK]).
Deterministic. Not run in CI; run by hand:

    /var/tmp/pyref/venv/bin/python tools/make_bert_tokens.py

Writes tests/fixtures/bert/vocab.txt, tests/fixtures/tokens/bert_medvlsm_ids.tsv and
tests/fixtures/tokens/bert_extra.json.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_fixtures import EXTRA_PROMPTS, ROOT, ids_digest, medvlsm_prompts, prompt_key  # noqa: E402

from tokenizers import BertWordPieceTokenizer  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_EXTRA = EXTRA_PROMPTS + [
    "Ça, c'est une lésion: Å ångström ÉCHO",
    "control\x00chars\x07 and \u200b zero width",
    "MIXED Case Polyp; (left) [right] {center}!",
    "supercalifragilisticexpialidocious" * 4,
    "hyperechoic-hypoechoic/anechoic",
]


def main():
    prompts = medvlsm_prompts()
    out = ROOT / "tests" / "fixtures"
    (out / "bert").mkdir(parents=True, exist_ok=True)
    trainer = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(prompts))
        corpus = f.name
    # A small vocabulary, so frequent words stay whole and rarer ones split into pieces.
    trainer.train([corpus], vocab_size=1200, min_frequency=2, special_tokens=SPECIALS,
                  limit_alphabet=200, wordpieces_prefix="##")
    vocab = sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])
    vocab_path = out / "bert" / "vocab.txt"
    vocab_path.write_text("".join(tok + "\n" for tok, _ in vocab))
    (out / "bert" / "tokenizer_config.json").write_text('{"do_lower_case": true}\n')
    tok = BertTokenizer(str(vocab_path), do_lower_case=True)
    assert tok.pad_token_id == 0 and tok.cls_token_id == 2 and tok.sep_token_id == 3
    call = dict(max_length=256, truncation=True, padding="max_length")
    rows, unk = [], 0
    for p in prompts:
        ids = tok(p, **call)["input_ids"]
        unk += tok.unk_token_id in ids
        rows.append(f"{prompt_key(p)}\t{ids_digest(ids)}")
    (out / "tokens" / "bert_medvlsm_ids.tsv").write_text(
        "# sha256(prompt)[:16] <TAB> sha256(' '.join(ids))[:16]; ids from transformers "
        "BertTokenizer(do_lower_case=True), max_length=256, truncation, padding=max_length\n"
        + "\n".join(rows) + "\n")
    extra = []
    for p in BERT_EXTRA:
        enc = tok(p, **call)
        extra.append(dict(prompt=p, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    (out / "tokens" / "bert_extra.json").write_text(json.dumps(extra, ensure_ascii=False, indent=0))
    print(f"{len(prompts)} prompts ({unk} with [UNK]), vocabulary {len(vocab)} tokens")


if __name__ == "__main__":
    main()
