#!/usr/bin/env python3
"""Builds vlsm's own BiomedCLIPSeg / BiomedCLIPSeg-D fixtures by running the study's code:
medvlsm's `BiomedCLIPSeg` module (../shared/reference/medvlsm/biomedclipseg.py, MIT,
imported as it is) on open_clip 2.24 / timm 0.9.2 (medvlsm's pins) with tiny random weights.

The hub cannot be reached here, so `open_clip.create_model("hf-hub:…")` is pointed at the
same model built locally (`CustomTextCLIP` with a registered tiny timm ViT and a BERT whose
`config.json` is a local folder), and `CLIPSegConfig.from_pretrained` at a local CIDAS-style
folder. Sizes differ from the shared fixtures (ViT 24 wide, 3 heads, MLP ratio 2.5, 64 px;
BERT 30 wide, 2 layers) so shape bugs show. Deterministic. Not run in CI; run by hand:

    /var/tmp/pyref/venv/bin/pip install open_clip_torch==2.24.0 timm==0.9.2
    /var/tmp/pyref/venv/bin/python tools/make_bert_tokens.py   # the vocabulary used here
    /var/tmp/pyref/venv/bin/python tools/make_biomed_fixtures.py

Writes tests/fixtures/biomedclipseg/:
  hub/<id>/...          the three repos medvlsm reads, under their real ids and file names
                        (BiomedCLIP: open_clip_config.json + open_clip_pytorch_model.bin;
                        BiomedBERT: config.json, vocab.txt, tokenizer_config.json;
                        CIDAS: config.json + model.safetensors, a full tiny CLIPSeg)
  checkpoints/best.ckpt Lightning-style (state_dict net.*, AdamW state, pickled DiceCELoss
                        and functools.partial objects); best.safetensors (same state_dict);
                        best-fp16.ckpt (state_dict in float16); evil.ckpt (a hyper-parameter
                        whose unpickling calls os.system: must be refused, never run)
  reference.safetensors float64 reference of the trained model (f32 weights and fp16-rounded
                        weights) and of -D: taps, pooled text, FiLM vector, logits
  manifest.json         prompts, images, versions
"""

import functools
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT.parent / "shared" / "reference" / "medvlsm"
OUT = ROOT / "tests" / "fixtures" / "biomedclipseg"
VOCAB = ROOT / "tests" / "fixtures" / "bert" / "vocab.txt"
IMAGES = ["rgb_150x100.png", "grey_120x90.png"]
PROMPTS = [
    ("rgb_150x100.png", ""),
    ("rgb_150x100.png", "one small pink round polyp, located in left of the image"),
    ("grey_120x90.png", "Enlarged Cardiomediastinum of shape rectangle, located in center of the frontal view of a Chest Xray."),
    ("grey_120x90.png", "Bénign LÉSION"),
]
BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
CIDAS = "CIDAS/clipseg-rd64-refined"
S = 64
VIT = dict(patch_size=16, embed_dim=24, depth=12, num_heads=3, mlp_ratio=2.5, img_size=S,
           qkv_bias=True, class_token=True, global_pool="token", layer_norm_eps=1e-6)
EMBED = 16


def main():
    import open_clip
    import timm
    import transformers
    from PIL import Image
    from safetensors.torch import save_file
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertTokenizer, CLIPSegConfig, CLIPSegForImageSegmentation

    torch.manual_seed(1313)
    hub = OUT / "hub"
    bert_dir, cidas_dir, clip_dir = hub / BERT, hub / CIDAS, hub / BIOMEDCLIP
    for d in (bert_dir, cidas_dir, clip_dir, OUT / "checkpoints"):
        d.mkdir(parents=True, exist_ok=True)

    # BERT repo: config (like the real minimal file: no pad_token_id / layer_norm_eps) + tokenizer.
    vocab = VOCAB.read_text()
    bert_cfg = dict(architectures=["BertForMaskedLM"], model_type="bert", attention_probs_dropout_prob=0.1,
                    hidden_act="gelu", hidden_dropout_prob=0.1, hidden_size=30, initializer_range=0.02,
                    intermediate_size=50, max_position_embeddings=512, num_attention_heads=3,
                    num_hidden_layers=2, type_vocab_size=2, vocab_size=len(vocab.splitlines()))
    (bert_dir / "config.json").write_text(json.dumps(bert_cfg, indent=2))
    (bert_dir / "vocab.txt").write_text(vocab)
    (bert_dir / "tokenizer_config.json").write_text('{"do_lower_case": true}\n')

    # CIDAS-style CLIPSeg: the decoder config medvlsm reads (vision width = the ViT's).
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=77, eos_token_id=2),
        vision_config=dict(hidden_size=VIT["embed_dim"], intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16),
        projection_dim=EMBED, extract_layers=[3, 6, 9], reduce_dim=10, decoder_num_attention_heads=2,
        decoder_intermediate_size=20, conditional_layer=0, use_complex_transposed_convolution=True)
    cidas = CLIPSegForImageSegmentation(cfg).eval()
    randomise(cidas)
    cidas.save_pretrained(str(cidas_dir), safe_serialization=True)

    # A tiny timm ViT by name, as open_clip's TimmModel creates it.
    name = "vit_vlsm_w24_d12_h3_p16_s64"

    @register_model
    def vit_vlsm_w24_d12_h3_p16_s64(pretrained=False, **kwargs):
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        args = {k: v for k, v in VIT.items() if k not in ("layer_norm_eps",)}
        args.update(kwargs)
        model = VisionTransformer(**args)
        model.pretrained_cfg = model.default_cfg = {}
        return model

    del vit_vlsm_w24_d12_h3_p16_s64  # registered
    open_clip_cfg = {
        "model_cfg": {
            "embed_dim": EMBED,
            "vision_cfg": {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": S},
            "text_cfg": {"hf_model_name": BERT, "hf_tokenizer_name": BERT, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
        "timm_model_cfg": {"name": name, "class": "timm.models.vision_transformer.VisionTransformer",
                           "like": "vit_base_patch16_224", "kwargs": VIT},
    }
    (clip_dir / "open_clip_config.json").write_text(json.dumps(open_clip_cfg, indent=2))

    def create_model(api, **_):
        assert api == f"hf-hub:{BIOMEDCLIP}", api
        text = dict(open_clip_cfg["model_cfg"]["text_cfg"], hf_model_name=str(bert_dir),
                    hf_tokenizer_name=str(bert_dir), hf_model_pretrained=False)
        return open_clip.model.CustomTextCLIP(EMBED, open_clip_cfg["model_cfg"]["vision_cfg"], text)

    real_from_pretrained = CLIPSegConfig.from_pretrained.__func__
    open_clip.create_model = create_model
    CLIPSegConfig.from_pretrained = classmethod(
        lambda cls, api, **kw: real_from_pretrained(cls, str(cidas_dir) if api == CIDAS else api, **kw))
    real_model_from_pretrained = CLIPSegForImageSegmentation.from_pretrained.__func__
    CLIPSegForImageSegmentation.from_pretrained = classmethod(
        lambda cls, api, **kw: real_model_from_pretrained(cls, str(cidas_dir) if api == CIDAS else api, **kw))

    sys.path.insert(0, str(REF))
    from biomedclipseg import BiomedCLIPSeg  # medvlsm's module, unmodified

    trained = BiomedCLIPSeg(f"hf-hub:{BIOMEDCLIP}", CIDAS, rand_init_decoder=True).eval()
    randomise(trained)
    towers = trained.biomedclip.state_dict()
    towers["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save(towers, clip_dir / "open_clip_pytorch_model.bin")
    # -D: same towers, CIDAS's decoder.
    with_cidas = BiomedCLIPSeg(f"hf-hub:{BIOMEDCLIP}", CIDAS, rand_init_decoder=False).eval()
    with_cidas.biomedclip.load_state_dict(trained.biomedclip.state_dict())

    # Lightning-style checkpoints of the trained model.
    state = {f"net.{k}": v for k, v in trained.state_dict().items()}
    import monai.losses
    decoder_params = list(trained.decoder.parameters())
    opt = torch.optim.AdamW(decoder_params, lr=2e-4, weight_decay=1e-3)
    ckpt = {
        "epoch": 3, "global_step": 42, "pytorch-lightning_version": "2.0.0",
        "state_dict": state,
        "optimizer_states": [{"state": {i: {"step": torch.tensor(42.0), "exp_avg": torch.zeros_like(p),
                                            "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(decoder_params)},
                              "param_groups": opt.state_dict()["param_groups"]}],
        "lr_schedulers": [{"factor": 0.1, "patience": 5}],
        "loops": {}, "callbacks": {}, "hparams_name": "kwargs",
        "hyper_parameters": {
            "loss_fn": monai.losses.DiceCELoss(lambda_dice=1.0, lambda_ce=0.2),
            "optimizer": functools.partial(torch.optim.AdamW, lr=2e-4, weight_decay=1e-3),
            "scheduler": functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.1, patience=5),
            "threshold": 0.5,
        },
    }
    torch.save(ckpt, OUT / "checkpoints" / "best.ckpt")
    save_file({k: v.contiguous() for k, v in state.items()}, OUT / "checkpoints" / "best.safetensors")
    # A hostile checkpoint: real tensors, plus a hyper-parameter whose unpickling would run
    # `os.system` (torch.load with weights_only=False would). Never loaded here.
    torch.save({"state_dict": {k: v for k, v in state.items() if k.startswith("net.decoder.film")},
                "hyper_parameters": {"loss_fn": Pwn()}}, OUT / "checkpoints" / "evil.ckpt")
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(dict(ckpt, state_dict=half, optimizer_states=[]), OUT / "checkpoints" / "best-fp16.ckpt")

    # Inputs: medvlsm's dataset transforms and its tokenizer call.
    import torchvision.transforms as T
    tf = T.Compose([T.Resize([S, S]), T.ToTensor(),
                    T.Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])])
    images = ROOT / "tests" / "fixtures" / "images"
    pixels = torch.stack([tf(Image.open(images / n).convert("RGB")) for n in IMAGES])
    index = torch.tensor([IMAGES.index(i) for i, _ in PROMPTS])
    tok = BertTokenizer(str(bert_dir / "vocab.txt"), do_lower_case=True)
    enc = tok([p for _, p in PROMPTS], max_length=256, truncation=True, padding="max_length", return_tensors="pt")

    out = {"pixel_values": pixels, "image_index": index, "input_ids": enc["input_ids"],
           "attention_mask": enc["attention_mask"]}

    def run(model, tag):
        model = model.double()
        with torch.no_grad():
            px = pixels.double()
            _, states = model._forward_vit(px, output_hidden_states=True)
            for b in (4, 7, 10):
                out[f"{tag}.vision.block_output.{b}"] = states[b]
            bert = model.biomedclip.text
            last = bert.transformer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out[f"{tag}.text.pooled"] = last[:, 0]
            out[f"{tag}.text.projected"] = model._forward_bert(enc["input_ids"], enc["attention_mask"])
            out[f"{tag}.logits"] = model(px[index], enc["input_ids"], enc["attention_mask"])
        model.float()

    run(trained, "trained")
    run(with_cidas, "d")
    # The fp16 checkpoint's exact model: the same weights rounded to float16.
    rounded = BiomedCLIPSeg(f"hf-hub:{BIOMEDCLIP}", CIDAS, rand_init_decoder=True).eval()
    rounded.load_state_dict({k[4:]: v.float() for k, v in half.items()})
    run(rounded, "fp16")
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "reference.safetensors")

    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "generator": "tools/make_biomed_fixtures.py",
        "reference_code": "medvlsm biomedclipseg.py (../shared/reference/medvlsm), unmodified",
        "versions": {"torch": torch.__version__, "open_clip_torch": open_clip.version.__version__,
                     "timm": timm.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
        "input_size": S, "vit": VIT, "bert": bert_cfg, "embed_dim": EMBED,
        "images": IMAGES, "pairs": [{"image": i, "prompt": p} for i, p in PROMPTS],
        "taps": "block outputs 4, 7, 10 (medvlsm hidden_states[i + 1] for extract_layers [3, 6, 9])",
        "threshold": 0.5,
        "reference": "float64 forward of medvlsm's BiomedCLIPSeg: trained.* (best.ckpt), fp16.* "
                     "(best-fp16.ckpt's weights), d.* (BiomedCLIPSeg-D, CIDAS decoder)",
        "files": {str(p.relative_to(OUT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.2f} MB")


class Pwn:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/vlsm-pwned-by-evil-ckpt",))


def randomise(module):
    """Every parameter re-randomised (LayerNorm affine and biases included), deterministic."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


if __name__ == "__main__":
    main()
