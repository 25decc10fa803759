#!/usr/bin/env python3
"""Reference training steps for CRIS, run with medvlsm's CRIS module itself: vlsm's own fixture
(tests/fixtures/cris/cris.pt, made by tools/make_cris_fixtures.py) at 128 px (the position
table resized 3×3 → 4×4), every parameter trainable, BatchNorm in training mode, the study's
loss (MONAI DiceLoss on sigmoid probabilities, what medvlsm's DiceCELoss(λ_ce=0.2) computes
under MONAI 1.1.0), AdamW (weight decay 1e-3, lr 1e-3 here so three steps move the weights
visibly), gradient clipping at global norm 0.5. Dropout is 0 so both sides are deterministic
(vlsm's dropout draws its own masks). Three steps on one batch of two samples.

    /var/tmp/pyref/venv/bin/python tools/make_cris_train_reference.py

Writes tests/fixtures/cris/train_reference.safetensors: the inputs (pixel_values, input_ids,
target), the loss of each step, and after the first and the third step a few parameters and
BatchNorm running statistics (`first.<key>`, `after.<key>`; `before.<key>` the start).
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT.parent / "shared" / "reference" / "medvlsm"
OUT = ROOT / "tests" / "fixtures" / "cris"
S = 128
KEYS = [
    "backbone.visual.conv1.weight",
    "backbone.visual.bn1.weight",
    "backbone.visual.bn1.running_mean",
    "backbone.visual.bn1.running_var",
    "backbone.visual.layer3.0.bn3.running_var",
    "backbone.visual.attnpool.positional_embedding",
    "backbone.visual.attnpool.c_proj.weight",
    "backbone.transformer.resblocks.1.attn.in_proj_weight",
    "backbone.text_projection",
    "neck.txt_proj.0.weight",
    "neck.txt_proj.1.running_mean",
    "neck.txt_proj.1.running_var",
    "neck.coordconv.0.conv1.0.weight",
    "decoder.layers.0.multihead_attn.in_proj_weight",
    "decoder.layers.1.ffn.0.weight",
    "decoder.norm.weight",
    "proj.txt.weight",
    "proj.txt.bias",
    "proj.vis.4.weight",
]


def main():
    import monai
    from monai.losses import DiceLoss
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(REF))
    from cris_model.segmenter import CRIS

    torch.manual_seed(128)
    args = json.loads((OUT / "config.json").read_text())
    args.pop("model_type")
    args.update(img_size=S, dropout=0.0)
    state = torch.load(OUT / "cris.pt", weights_only=False)

    class FakeJit:  # CRIS.__init__ only takes CLIP's state dict from RN50.pt
        def state_dict(self):
            return {k[len("backbone."):]: v.clone() for k, v in state.items() if k.startswith("backbone.")}

    real = torch.jit.load
    torch.jit.load = lambda *a, **k: FakeJit()
    try:
        model = CRIS(clip_pretrain="RN50.pt", freeze_encoder=False, cris_pretrain=None, **args)
    finally:
        torch.jit.load = real
    model.load_state_dict(state)
    model.train()

    tok = CLIPTokenizer(str(ROOT / "tests/fixtures/tokenizer/vocab.json"), str(ROOT / "tests/fixtures/tokenizer/merges.txt"))
    prompts = ["one small pink round polyp !; located in left of the image", ""]
    ids = tok(prompts, max_length=77, truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    pixels = torch.randn(2, 3, S, S)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    target = torch.stack([((yy - 50) ** 2 / 900 + (xx - 70) ** 2 / 400 < 1).float(),
                          ((yy - 80) ** 2 / 300 + (xx - 40) ** 2 / 700 < 1).float()])[:, None]

    loss_fn = DiceLoss(sigmoid=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3, eps=1e-8)
    losses, norms, first = [], [], None
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(model(pixels, ids), target)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        opt.step()
        losses.append(loss.item())
        if first is None:
            first = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    after = model.state_dict()
    out = {"pixel_values": pixels, "input_ids": ids, "target": target[:, 0],
           "losses": torch.tensor(losses, dtype=torch.float64)}
    for k in KEYS:
        out[f"first.{k}"] = first[k]
        out[f"after.{k}"] = after[k].float()
        out[f"before.{k}"] = state[k].float()
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "train_reference.safetensors")
    print(f"losses {losses}; norms {norms}; monai {monai.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
