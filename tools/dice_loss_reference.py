#!/usr/bin/env python3
"""Reference values of the training loss: MONAI's DiceLoss on sigmoid probabilities, as
medvlsm computes it (`base_module.py` applies sigmoid, then `DiceCELoss(lambda_dice=1,
lambda_ce=0.2)`, whose CE term is 0 on one channel under MONAI 1.1.0: effectively
`DiceLoss(sigmoid=False)` on the probabilities), with its gradient with respect to the logits.

Writes tests/fixtures/train/dice_loss_reference.json. Run:
  python tools/dice_loss_reference.py      (needs torch, monai)
"""

import json
import pathlib

import monai
import torch
from monai.losses import DiceLoss

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/train/dice_loss_reference.json"


def main():
    torch.manual_seed(20261128)
    cases = []
    for b, s in [(1, 4), (3, 8), (2, 16)]:
        logits = (torch.randn(b, 1, s, s, dtype=torch.float64) * 3).requires_grad_(True)
        target = (torch.rand(b, 1, s, s, dtype=torch.float64) < 0.3).double()
        if b == 3:
            target[1] = 0  # an empty mask
        loss = DiceLoss(sigmoid=False)(torch.sigmoid(logits), target)
        loss.backward()
        cases.append(
            {
                "shape": [b, s, s],
                "logits": logits.detach().flatten().tolist(),
                "target": target.flatten().tolist(),
                "loss": loss.item(),
                "grad": logits.grad.flatten().tolist(),
            }
        )
        print(b, s, loss.item())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"monai": monai.__version__, "torch": torch.__version__, "cases": cases}) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
