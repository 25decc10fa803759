#!/usr/bin/env python3
"""Builds vlsm's own CRIS fixture by running the study's code: medvlsm's `CRIS` module
(../shared/reference/medvlsm/cris_model, MIT, imported as it is) on tiny random weights,
at the study's 416 px with the full CLIP vocabulary (tests/fixtures/tokenizer, 49,408 tokens).

`CRIS.__init__` reads OpenAI's TorchScript `RN50.pt` with `torch.jit.load` only to take its
`state_dict()`; no such file exists here, so `torch.jit.load` is pointed at a tiny random
CLIP state dict of the same layout (medvlsm's own `cris_model.clip.CLIP`), and for the float64
reference CLIP's fp16-guard `LayerNorm` (which casts to float32) runs as plain `nn.LayerNorm`.
Everything else runs unmodified. Sizes differ from ../shared/fixtures/tiny_cris (ResNet width 8 with [2, 1, 2, 1]
blocks and a 3×3 position grid resized to 13×13, text 2 blocks, decoder 2 layers of 8 heads,
embed 48) so shape bugs show. Every parameter is re-randomised; BatchNorm running statistics
are calibrated on a batch like the inputs (so activations stay in range), then perturbed, with
variances kept ≥ 0.05 (no channel amplifies rounding noise 300-fold). Token
embedding rows no prompt here uses are zero so the committed files compress; the rows used
are random. Deterministic. Not run in CI; run by hand:

    /var/tmp/pyref/venv/bin/python tools/make_cris_fixtures.py

Writes tests/fixtures/cris/:
  cris.pt                     the state dict as medvlsm's convert_cris_model.py writes it
                              (no prefix, pickle protocol 5)
  config.json                 vlsm's CRIS config (model_type cris + medvlsm's argument names)
  checkpoints/best-fp16.ckpt  Lightning-style: state_dict `net.*` in float16, plus pickled
                              DiceCELoss / functools.partial hyper-parameters
  checkpoints/evil.ckpt       a hyper-parameter whose unpickling calls os.system (refused)
  reference.safetensors       inputs (pixel_values, input_ids) and the float64 forward (stored
                              rounded to float32) of the f32 weights (f32.*: C3/C4/C5, word
                              features, state, neck, decoder layers, projector, logits) and
                              the logits of the fp16-rounded weights (fp16.logits)
  manifest.json               sizes, prompts, versions, sha256
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
OUT = ROOT / "tests" / "fixtures" / "cris"
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
IMAGES = ROOT / "tests" / "fixtures" / "images"
S = 416
PROMPTS = [
    ("rgb_150x100.png", ""),
    ("rgb_150x100.png", "one small pink round polyp !; located in left of the image"),
    ("rgb_150x100.png", "Enlarged Cardiomediastinum of shape rectangle, located in center of the frontal view of a Chest Xray."),
]
CLIP_ARGS = dict(embed_dim=48, image_resolution=96, vision_layers=(2, 1, 2, 1), vision_width=8,
                 vision_patch_size=None, context_length=77, txt_length=77, vocab_size=49408,
                 transformer_width=64, transformer_heads=1, transformer_layers=2)
NET_ARGS = dict(word_len=77, fpn_in=[64, 128, 48], fpn_out=[24, 64, 40], vis_dim=64, word_dim=48,
                num_layers=2, num_head=8, dim_ffn=40, dropout=0.2, intermediate=False, img_size=S)


def main():
    import monai
    import monai.losses
    import torchvision
    import torchvision.transforms as T
    import transformers
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(REF))
    from cris_model import clip as cris_clip  # medvlsm's modules, unmodified
    from cris_model.segmenter import CRIS

    torch.manual_seed(416)
    (OUT / "checkpoints").mkdir(parents=True, exist_ok=True)

    tok = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"))
    enc = tok([p for _, p in PROMPTS], max_length=77, truncation=True, padding="max_length",
              return_tensors="pt")
    used = sorted(set(enc["input_ids"].flatten().tolist()))

    clip_model = cris_clip.CLIP(**CLIP_ARGS)
    clip_state = clip_model.state_dict()

    class FakeJit:
        def state_dict(self):
            return {k: v.clone() for k, v in clip_state.items()}

    real_jit_load = torch.jit.load
    torch.jit.load = lambda *a, **k: FakeJit()
    try:
        model = CRIS(clip_pretrain="RN50.pt", freeze_encoder=False, cris_pretrain=None, **NET_ARGS)
    finally:
        torch.jit.load = real_jit_load
    randomise(model, used)
    with torch.no_grad():
        # The dynamic kernel's scale: logits of a few units, so the mask is not all foreground.
        model.proj.txt.weight.mul_(0.1)

    # Inputs: medvlsm's dataset transforms (configs/experiment/cris.yaml) and tokenizer call.
    tf = T.Compose([T.Resize([S, S]), T.ToTensor(),
                    T.Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])])
    names = sorted(set(i for i, _ in PROMPTS))
    pixels = torch.stack([tf(Image.open(IMAGES / n).convert("RGB")) for n in names])
    index = torch.tensor([names.index(i) for i, _ in PROMPTS])
    calibrate(model, pixels, enc["input_ids"])
    model.eval()
    state = model.state_dict()

    torch.save(state, OUT / "cris.pt", pickle_protocol=5)
    for k, v in sorted(state.items(), key=lambda kv: -kv[1].numel())[:4]:
        print(f"{k}: {list(v.shape)}")
    (OUT / "config.json").write_text(json.dumps(dict(model_type="cris", **NET_ARGS), indent=2) + "\n")
    half = {f"net.{k}": (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    ckpt = {
        "epoch": 7, "global_step": 70, "pytorch-lightning_version": "2.0.0",
        "state_dict": half, "optimizer_states": [], "lr_schedulers": [{"factor": 0.1, "patience": 5}],
        "loops": {}, "callbacks": {}, "hparams_name": "kwargs",
        "hyper_parameters": {
            "loss_fn": monai.losses.DiceCELoss(lambda_dice=1.0, lambda_ce=0.2),
            "optimizer": functools.partial(torch.optim.AdamW, lr=2e-5, weight_decay=1e-3),
            "scheduler": functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.1, patience=5),
            "threshold": 0.35,
        },
    }
    torch.save(ckpt, OUT / "checkpoints" / "best-fp16.ckpt")
    torch.save({"state_dict": {k: v for k, v in half.items() if k.startswith("net.proj.txt")},
                "hyper_parameters": {"loss_fn": Pwn()}}, OUT / "checkpoints" / "evil.ckpt")

    out = {"pixel_values": pixels, "image_index": index, "input_ids": enc["input_ids"],
           "attention_mask": enc["attention_mask"]}

    # CLIP's LayerNorm subclass computes in float32 to survive fp16 weights; for the float64
    # reference it runs as plain nn.LayerNorm (the same function, at float64).
    cris_clip.LayerNorm.forward = torch.nn.LayerNorm.forward

    def run(m, tag, dtype=torch.float64):
        m = m.to(dtype).eval()
        cap = {}
        hooks = [m.neck.register_forward_hook(lambda _m, _i, o: cap.__setitem__("neck.output", o)),
                 m.proj.vis.register_forward_hook(lambda _m, _i, o: cap.__setitem__("proj.vis", o))]
        for i, layer in enumerate(m.decoder.layers):
            hooks.append(layer.register_forward_hook(
                lambda _m, _i, o, i=i: cap.__setitem__(f"decoder.layer_output.{i}", o.transpose(0, 1))))
        hooks.append(m.decoder.register_forward_hook(lambda _m, _i, o: cap.__setitem__("decoder.output", o)))
        hooks.append(m.proj.register_forward_hook(lambda _m, _i, o: cap.__setitem__("proj.output", o)))
        with torch.no_grad():
            px = pixels.to(dtype)
            c3, c4, c5 = m.backbone.encode_image(px)
            out[f"{tag}.vision.C3"], out[f"{tag}.vision.C4"], out[f"{tag}.vision.C5"] = c3, c4, c5
            words, st = m.backbone.encode_text(enc["input_ids"])
            out[f"{tag}.text.word_features"], out[f"{tag}.text.state"] = words, st
            out[f"{tag}.logits"] = m(px[index], enc["input_ids"])
        for h in hooks:
            h.remove()
        for k, v in cap.items():
            out[f"{tag}.{k}"] = v
        m.float()

    run(model, "f32")
    # medvlsm's own float32 forward against the float64 one: how much of a port's difference
    # float32 rounding alone explains.
    run(model, "torch32", torch.float32)
    f32_vs_f64 = {k[8:]: float((out[k].double() - out["f32." + k[8:]]).abs().max())
                  for k in list(out) if k.startswith("torch32.")}
    for k in [k for k in out if k.startswith("torch32.")]:
        del out[k]
    import copy
    rounded = copy.deepcopy(model)
    rounded.load_state_dict({k[4:]: v.float() if v.is_floating_point() else v for k, v in half.items()})
    run(rounded, "fp16")
    # Stored as float32 (the float64 values rounded once): the tolerance is 3e-4, and half
    # the bytes. proj.vis keeps its first sample only.
    out["f32.proj.vis"] = out["f32.proj.vis"][:1]
    keep = ("pixel_values", "image_index", "input_ids", "attention_mask", "fp16.logits")
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in out.items()
           if k.startswith("f32.") or k in keep}
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "reference.safetensors")

    sig = torch.sigmoid(out["f32.logits"])
    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "generator": "tools/make_cris_fixtures.py",
        "reference_code": "medvlsm cris_model (../shared/reference/medvlsm), unmodified; torch.jit.load "
                          "pointed at a tiny random CLIP state dict",
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "transformers": transformers.__version__, "monai": monai.__version__,
                     "numpy": np.__version__},
        "clip_args": {k: list(v) if isinstance(v, tuple) else v for k, v in CLIP_ARGS.items()},
        "cris_net_args": NET_ARGS, "images": names,
        "pairs": [{"image": i, "prompt": p} for i, p in PROMPTS],
        "token_ids": enc["input_ids"].tolist(),
        "threshold": 0.35,
        "logits_absmax": float(out["f32.logits"].abs().max()),
        "absmax": {k[4:]: float(v.abs().max()) for k, v in out.items() if k.startswith("f32.")},
        "torch_f32_vs_f64_maxabs": f32_vs_f64,
        "fraction_sigmoid_gt_0.35": float((sig > 0.35).double().mean()),
        "reference": "float64 forward of medvlsm's CRIS in eval mode, stored as float32: f32.* "
                     "(cris.pt), fp16.logits (best-fp16.ckpt's weights); decoder.layer_output.i "
                     "batch-first (B, HW, C); proj.vis first sample only",
        "files": {str(p.relative_to(OUT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.2f} MB; "
          f"|logits| <= {manifest['logits_absmax']:.2f}, {manifest['fraction_sigmoid_gt_0.35']:.3f} foreground")


class Pwn:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/vlsm-pwned-by-evil-ckpt",))


def randomise(model, used_tokens):
    """Every parameter re-randomised, deterministic; token rows no prompt uses are zero."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("token_embedding.weight"):
                rows = torch.zeros_like(p)
                rows[used_tokens] = 0.2 * torch.randn(len(used_tokens), p.shape[1])
                p.copy_(rows)
            elif ("norm" in name.lower() or ".ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))


def calibrate(model, pixels, ids):
    """BatchNorm running statistics (cumulative average) from a batch like the fixture's inputs
    (its image, mirrored, and noise; its prompts), so activations stay of order one, then
    perturbed."""
    bns = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    gen = torch.Generator().manual_seed(7)
    px = torch.cat([pixels[:1], pixels[:1].flip(-1), 0.5 * torch.randn(1, 3, S, S, generator=gen)])
    with torch.no_grad():
        model(px, ids[:3])
        for m in bns:
            m.momentum = 0.1
            std = m.running_var.sqrt()
            m.running_mean.add_(0.2 * std * torch.randn_like(std))
            m.running_var.mul_(torch.empty_like(std).uniform_(0.7, 1.4))
            # A channel ReLU left (nearly) dead has variance ≈ 0: eval-mode BatchNorm would
            # blow its rounding noise up by 1/√eps. Keep such channels at a modest gain.
            m.running_var.clamp_(min=0.05)
    model.eval()


if __name__ == "__main__":
    main()
