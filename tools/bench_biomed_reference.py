#!/usr/bin/env python3
"""Times BiomedCLIPSeg-D at full size (ViT-B/16 + PubMedBERT-base, random weights: speed does
not depend on the values) with medvlsm's own module on open_clip 2.24 / timm 0.9.2 (PyTorch)
and with ONNX Runtime on its export, the way the study's code runs it: one forward per
(image, prompt) pair, the image re-encoded for every prompt, prompts padded to 256 tokens.

    python tools/bench_biomed_reference.py setup DIR   # DIR/hub (mirror layout), DIR/model.onnx, DIR/image.png
    python tools/bench_biomed_reference.py torch DIR   # one JSON line per case
    python tools/bench_biomed_reference.py ort DIR

tools/bench-biomed.sh runs both and vlsm (`--hub-mirror DIR/hub --arch biomedclipseg-d`) in one
go and prints the table with tools/bench_reference.py's `table`. The BERT vocabulary is
tests/fixtures/bert/vocab.txt padded with `[unusedN]` to BiomedBERT's 30,522 tokens (the real
file cannot be downloaded here; the prompts tokenize to real, unpadded words either way).
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_reference import PROMPTS, peak_mib, timed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT.parent / "shared" / "reference" / "medvlsm"
BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
CIDAS = "CIDAS/clipseg-rd64-refined"
SIZE = 224


def open_clip_config():
    return {
        "model_cfg": {
            "embed_dim": 512,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": SIZE},
            "text_cfg": {"hf_model_name": BERT, "hf_tokenizer_name": BERT, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }


def build(hub: Path):
    """medvlsm's BiomedCLIPSeg-D on the local hub folders (open_clip's hf-hub download and
    transformers' from_pretrained pointed at them)."""
    import open_clip
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    cfg = open_clip_config()

    def create_model(api, **_):
        text = dict(cfg["model_cfg"]["text_cfg"], hf_model_name=str(hub / BERT),
                    hf_tokenizer_name=str(hub / BERT), hf_model_pretrained=False)
        return open_clip.model.CustomTextCLIP(512, cfg["model_cfg"]["vision_cfg"], text)

    open_clip.create_model = create_model
    local = lambda api: str(hub / CIDAS) if api == CIDAS else api  # noqa: E731
    cfg_fp = CLIPSegConfig.from_pretrained.__func__
    CLIPSegConfig.from_pretrained = classmethod(lambda c, api, **kw: cfg_fp(c, local(api), **kw))
    model_fp = CLIPSegForImageSegmentation.from_pretrained.__func__
    CLIPSegForImageSegmentation.from_pretrained = classmethod(lambda c, api, **kw: model_fp(c, local(api), **kw))
    sys.path.insert(0, str(REF))
    from biomedclipseg import BiomedCLIPSeg

    return BiomedCLIPSeg(f"hf-hub:{BIOMEDCLIP}", CIDAS, rand_init_decoder=False).eval()


def inputs(hub: Path, n):
    from transformers import BertTokenizer

    tok = BertTokenizer(str(hub / BERT / "vocab.txt"), do_lower_case=True)
    enc = tok(PROMPTS[:n], max_length=256, truncation=True, padding="max_length", return_tensors="np")
    from PIL import Image

    img = np.asarray(Image.open(hub.parent / "image.png").convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    px = ((img.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
    return px.repeat(n, 0), enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def setup(out: Path):
    import torch
    from PIL import Image
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    torch.manual_seed(0)
    hub = out / "hub"
    for d in (BIOMEDCLIP, BERT, CIDAS):
        (hub / d).mkdir(parents=True, exist_ok=True)
    words = (ROOT / "tests/fixtures/bert/vocab.txt").read_text().splitlines()
    words += [f"[unused{i}]" for i in range(30522 - len(words))]
    (hub / BERT / "vocab.txt").write_text("".join(w + "\n" for w in words))
    (hub / BERT / "tokenizer_config.json").write_text('{"do_lower_case": true}\n')
    (hub / BERT / "config.json").write_text(json.dumps(dict(
        architectures=["BertForMaskedLM"], model_type="bert", attention_probs_dropout_prob=0.1,
        hidden_act="gelu", hidden_dropout_prob=0.1, hidden_size=768, initializer_range=0.02,
        intermediate_size=3072, max_position_embeddings=512, num_attention_heads=12,
        num_hidden_layers=12, type_vocab_size=2, vocab_size=30522)))
    (hub / BIOMEDCLIP / "open_clip_config.json").write_text(json.dumps(open_clip_config(), indent=2))
    config = CLIPSegConfig(
        projection_dim=512, extract_layers=[3, 6, 9], reduce_dim=64, decoder_num_attention_heads=4,
        decoder_intermediate_size=2048, conditional_layer=0, use_complex_transposed_convolution=True,
        vision_config=dict(patch_size=16), text_config=dict(bos_token_id=0, eos_token_id=2, pad_token_id=1))
    CLIPSegForImageSegmentation(config).save_pretrained(hub / CIDAS, safe_serialization=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(out / "image.png")
    model = build(hub)
    with torch.no_grad():  # ordinary magnitudes everywhere
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    torch.save(model.biomedclip.state_dict(), hub / BIOMEDCLIP / "open_clip_pytorch_model.bin")
    # The decoder medvlsm builds for -D is CIDAS's: keep the saved one in step.
    full = CLIPSegForImageSegmentation.from_pretrained(hub / CIDAS)
    full.decoder.load_state_dict(model.decoder.state_dict())
    full.save_pretrained(hub / CIDAS, safe_serialization=True)

    class Export(torch.nn.Module):
        """medvlsm's forward without its `inference_mode` block (which tracing cannot see
        through); the same operations."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values, input_ids, attention_mask):
            _, states = self.m._forward_vit(pixel_values, output_hidden_states=True)
            acts = [states[i + 1] for i in self.m.clip_seg_config.extract_layers]
            cond = self.m._forward_bert(input_ids, attention_mask=attention_mask)
            return self.m.decoder(acts, cond).logits[:, None]

    px, ids, mask = inputs(hub, 2)
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "eager"
    torch.onnx.export(
        Export(model), (torch.from_numpy(px), torch.from_numpy(ids), torch.from_numpy(mask)),
        str(out / "model.onnx"), input_names=["pixel_values", "input_ids", "attention_mask"],
        output_names=["logits"], opset_version=17, dynamo=False,
        dynamic_axes={k: {0: "b"} for k in ("pixel_values", "input_ids", "attention_mask", "logits")})
    print(json.dumps(dict(setup=str(out), parameters=sum(p.numel() for p in model.parameters()))))


def bench_torch(out: Path):
    import open_clip
    import torch

    torch.set_num_threads(1)
    hub = out / "hub"
    model = build(hub)
    model.biomedclip.load_state_dict(torch.load(hub / BIOMEDCLIP / "open_clip_pytorch_model.bin"))
    for n in (1, 10):
        px, ids, mask = (torch.from_numpy(a) for a in inputs(hub, n))
        with torch.no_grad():
            wall, cpu = timed(lambda: model(px, ids, mask))
        print(json.dumps(dict(framework=f"PyTorch {torch.__version__} (open_clip {open_clip.version.__version__} + medvlsm)",
                              case=f"1x{n}", wall_s=wall, cpu_s=cpu, peak_mib=peak_mib())))


def bench_ort(out: Path):
    import bench_reference

    bench_reference.bench_ort(out, lambda n: inputs(out / "hub", n), cases=[(1, 1), (1, 10)])


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"setup": setup, "torch": bench_torch, "ort": bench_ort}[mode](out)
