//! CLIP's byte-level BPE tokenizer, as Hugging Face's `CLIPTokenizerFast` runs it, through the
//! `tokenizers` crate: from `tokenizer.json`, or from `vocab.json` + `merges.txt` (then the
//! same pipeline is assembled here). Prompts are padded to the model's 77 positions.

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
const BERT_CLS: &str = "[CLS]";
const BERT_SEP: &str = "[SEP]";
const BERT_PAD: &str = "[PAD]";
const BERT_UNK: &str = "[UNK]";

/// A prompt as model input: `ids` and `attention_mask`, both `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    pub ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
}

impl TokenizedPrompt {
    /// Number of real (unpadded) tokens, BOS and EOS included.
    pub fn len(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A prompt tokenizer: CLIP BPE (CLIPSeg) or BERT WordPiece (BiomedCLIPSeg), with its
/// begin/end tokens (BOS/EOS, [CLS]/[SEP]), truncation and padding to a fixed length.
#[derive(Clone)]
pub struct PromptTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_length", &self.max_length)
            .finish()
    }
}

/// Optional settings from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Clone, Default)]
pub struct TokenizerSettings {
    pub pad_token: Option<String>,
    pub model_max_length: Option<usize>,
}

impl TokenizerSettings {
    /// Reads `pad_token` and `model_max_length` from any of the tokenizer's JSON side files.
    pub fn merge_json(&mut self, json: &[u8], file: &str) -> Result<()> {
        let v: Value =
            serde_json::from_slice(json).map_err(|e| Error::Tokenizer(format!("{file}: {e}")))?;
        match v.get("pad_token") {
            Some(Value::String(s)) => self.pad_token = Some(s.clone()),
            Some(Value::Object(o)) => {
                if let Some(Value::String(s)) = o.get("content") {
                    self.pad_token = Some(s.clone());
                }
            }
            _ => {}
        }
        // transformers writes a huge sentinel when no limit is known: ignore it.
        if let Some(n) = v.get("model_max_length").and_then(Value::as_u64)
            && n > 2
            && n <= 1 << 20
        {
            self.model_max_length = Some(n as usize);
        }
        Ok(())
    }
}

impl PromptTokenizer {
    /// From a `tokenizer.json` (the `tokenizers` crate's own format).
    pub fn from_tokenizer_json(
        json: &[u8],
        settings: &TokenizerSettings,
        max_length: usize,
    ) -> Result<Self> {
        let inner = Tokenizer::from_bytes(json)
            .map_err(|e| Error::Tokenizer(format!("tokenizer.json: {e}")))?;
        Self::new(inner, settings, max_length)
    }

    /// From HF slow-tokenizer files: `vocab.json` (token → id) and `merges.txt`.
    pub fn from_vocab_merges(
        vocab_json: &[u8],
        merges_txt: &[u8],
        settings: &TokenizerSettings,
        max_length: usize,
    ) -> Result<Self> {
        let vocab: serde_json::Map<String, Value> = serde_json::from_slice(vocab_json)
            .map_err(|e| Error::Tokenizer(format!("vocab.json: {e}")))?;
        let merges_text = std::str::from_utf8(merges_txt)
            .map_err(|_| Error::Tokenizer("merges.txt is not UTF-8".into()))?;
        let merges: Vec<&str> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .collect();
        if let Some(bad) = merges.iter().find(|l| l.split(' ').count() != 2) {
            return Err(Error::Tokenizer(format!(
                "merges.txt: malformed line `{bad}`"
            )));
        }
        let id_of = |tok: &str| {
            vocab
                .get(tok)
                .and_then(Value::as_u64)
                .ok_or_else(|| Error::Tokenizer(format!("vocab.json has no `{tok}` token")))
        };
        let (bos, eos) = (id_of(START_OF_TEXT)?, id_of(END_OF_TEXT)?);
        // The pipeline transformers' converter writes for CLIP (convert_slow_tokenizer.py).
        let special = |id: u64, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(bos, START_OF_TEXT), special(eos, END_OF_TEXT)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex":
                    "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
                 "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": END_OF_TEXT,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let bytes = serde_json::to_vec(&spec).expect("a JSON value serialises");
        let inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("vocab.json/merges.txt: {e}")))?;
        Self::new(inner, settings, max_length)
    }

    /// BERT's uncased WordPiece from `vocab.txt` (one token per line, the line number its
    /// id), as transformers' `BertTokenizer` with `do_lower_case` runs it: clean the text,
    /// split CJK characters, lowercase and strip accents, split on whitespace and
    /// punctuation, greedy longest-match pieces with `##`; [CLS] … [SEP], padded with [PAD]
    /// to `max_length` (BiomedCLIPSeg: 256).
    pub fn from_bert_vocab(vocab_txt: &[u8], lowercase: bool, max_length: usize) -> Result<Self> {
        let text = std::str::from_utf8(vocab_txt)
            .map_err(|_| Error::Tokenizer("vocab.txt is not UTF-8".into()))?;
        let mut vocab = serde_json::Map::new();
        // transformers keeps the last id of a repeated token.
        // Python's `readlines()`: the text after the last newline is a line only if non-empty.
        let lines = text.strip_suffix('\n').unwrap_or(text);
        for (id, token) in lines.split('\n').enumerate() {
            vocab.insert(token.to_string(), json!(id));
        }
        for special in [BERT_CLS, BERT_SEP, BERT_PAD, BERT_UNK] {
            if !vocab.contains_key(special) {
                return Err(Error::Tokenizer(format!(
                    "vocab.txt has no `{special}` token"
                )));
            }
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                           "handle_chinese_chars": true, "strip_accents": null,
                           "lowercase": lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordPiece", "unk_token": BERT_UNK,
                      "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                      "vocab": vocab}
        });
        let bytes = serde_json::to_vec(&spec).expect("a JSON value serialises");
        let inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("vocab.txt: {e}")))?;
        let settings = TokenizerSettings {
            pad_token: Some(BERT_PAD.into()),
            model_max_length: None,
        };
        Self::with_specials(inner, [BERT_CLS, BERT_SEP], &settings, max_length)
    }

    fn new(inner: Tokenizer, settings: &TokenizerSettings, max_length: usize) -> Result<Self> {
        Self::with_specials(inner, [START_OF_TEXT, END_OF_TEXT], settings, max_length)
    }

    fn with_specials(
        mut inner: Tokenizer,
        [begin, end]: [&str; 2],
        settings: &TokenizerSettings,
        max_length: usize,
    ) -> Result<Self> {
        // Truncation and padding are ours to do (below), whatever the file says.
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let id = |tok: &str| {
            inner
                .token_to_id(tok)
                .ok_or_else(|| Error::Tokenizer(format!("the vocabulary has no `{tok}` token")))
        };
        let bos = id(begin)?;
        let eos = id(end)?;
        let pad = id(settings.pad_token.as_deref().unwrap_or(end))?;
        let max_length = settings
            .model_max_length
            .unwrap_or(max_length)
            .min(max_length);
        if max_length < 2 {
            return Err(Error::Tokenizer(format!(
                "max_length {max_length} leaves no room for BOS and EOS"
            )));
        }
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_length,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// BOS + BPE ids (truncated to fit) + EOS, then padding to `max_length`.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let encoding = self
            .inner
            .encode(prompt, false)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize prompt: {e}")))?;
        let body = encoding.get_ids();
        let body = &body[..body.len().min(self.max_length - 2)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos as i64);
        ids.extend(body.iter().map(|&i| i as i64));
        ids.push(self.eos as i64);
        let real = ids.len();
        ids.resize(self.max_length, self.pad as i64);
        let mut attention_mask = vec![1i64; real];
        attention_mask.resize(self.max_length, 0);
        Ok(TokenizedPrompt {
            ids,
            attention_mask,
        })
    }
}
