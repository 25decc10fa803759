#!/usr/bin/env python3
"""PyTorch's decoder-training throughput on the setup `vlsm train` is measured on, for the
README's comparison: transformers' CLIPSegForImageSegmentation with frozen towers (as HF
runs them, under no_grad), AdamW (lr 2e-3, weight decay 1e-3) on the decoder, soft Dice
loss on sigmoid probabilities, clip_grad_norm_ 0.5, a validation pass each epoch.

  python tools/torch_train_throughput.py MODEL_DIR DATA_ROOT/DATASET [--batch-size 8]
      [--epochs 3] [--mode medvlsm|cached] [--prompt p1]

--mode medvlsm runs the frozen encoders in every step (what medvlsm does); --mode cached
runs them once and trains the decoder on the stored activations (what `vlsm train` does).
Prints samples/s over the epochs (training samples per second of wall time, validation
included; the one-off caching is reported apart). Needs torch, transformers, pillow.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor


def load_split(root: Path, split: str, prompt: str, processor, size: int):
    entries = json.loads((root / "anns" / f"{split}.json").read_text())
    images, masks, texts = [], [], []
    for e in entries:
        images.append(Image.open(root / "images" / e["img_name"]).convert("RGB"))
        mask = Image.open(root / "masks" / e["mask_name"]).convert("L").resize((size, size), Image.NEAREST)
        masks.append(torch.from_numpy((np.asarray(mask) > 127).astype(np.float32)))
        value = e["prompts"][prompt]
        texts.append(value if isinstance(value, str) else value[0])
    inputs = processor(text=texts, images=images, return_tensors="pt", padding="max_length")
    return inputs, torch.stack(masks)


def soft_dice_loss(logits, target):
    p = torch.sigmoid(logits).flatten(1)
    g = target.flatten(1)
    dice = (2 * (p * g).sum(1) + 1e-5) / (p.sum(1) + g.sum(1) + 1e-5)
    return (1 - dice).mean()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("dataset")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mode", choices=["medvlsm", "cached"], default="medvlsm")
    parser.add_argument("--prompt", default="p1")
    args = parser.parse_args()
    torch.manual_seed(42)
    model = CLIPSegForImageSegmentation.from_pretrained(args.model)
    processor = CLIPSegProcessor.from_pretrained(args.model)
    # The logits' side is the processor's input size (the vision tower resamples its grid).
    size = processor.image_processor.size["height"]
    for p in model.clip.parameters():
        p.requires_grad_(False)
    root = Path(args.dataset)
    train, train_masks = load_split(root, "train", args.prompt, processor, size)
    val, val_masks = load_split(root, "val", args.prompt, processor, size)
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=2e-3, weight_decay=1e-3, eps=1e-8)

    def encode(inputs):
        """The frozen towers' outputs: the decoder's taps and the FiLM conditioning."""
        with torch.no_grad():
            vision = model.clip.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True)
            taps = [vision.hidden_states[i + 1] for i in model.extract_layers]
            cond = model.get_conditional_embeddings(
                batch_size=inputs["pixel_values"].shape[0],
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
            )
        return taps, cond

    def logits_of(batch, cached):
        if cached is not None:
            taps, cond = cached
        else:
            taps, cond = encode(batch)
        return model.decoder(taps, cond).logits

    def batches(inputs, masks, order, cache):
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            batch = {k: v[idx] for k, v in inputs.items()}
            cached = None
            if cache is not None:
                cached = ([t[idx] for t in cache[0]], cache[1][idx])
            yield batch, masks[idx], cached

    train_cache = val_cache = None
    if args.mode == "cached":
        started = time.perf_counter()
        train_cache = encode(train)
        val_cache = encode(val)
        n = len(train_masks) + len(val_masks)
        print(f"cached {n} samples in {time.perf_counter() - started:.1f} s")

    n_train = len(train_masks)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(n_train)
        total = 0.0
        for batch, target, cached in batches(train, train_masks, order, train_cache):
            loss = soft_dice_loss(logits_of(batch, cached), target)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), 0.5)
            optimizer.step()
            total += loss.item() * len(target)
        model.eval()
        val_loss, dice = 0.0, []
        with torch.no_grad():
            for batch, target, cached in batches(val, val_masks, torch.arange(len(val_masks)), val_cache):
                logits = logits_of(batch, cached)
                val_loss += soft_dice_loss(logits, target).item() * len(target)
                pred = (torch.sigmoid(logits) > 0.5).float().flatten(1)
                g = target.flatten(1)
                inter, denom = (pred * g).sum(1), pred.sum(1) + g.sum(1)
                dice += torch.where(denom == 0, torch.ones_like(inter), 2 * inter / denom.clamp(min=1)).tolist()
        print(
            f"epoch {epoch}  train loss {total / n_train:.4f}  val loss {val_loss / len(val_masks):.4f}  "
            f"val Dice {np.mean(dice):.4f}"
        )
    elapsed = time.perf_counter() - started
    print(
        f"{args.mode}: {n_train * args.epochs} samples in {elapsed:.1f} s: "
        f"{n_train * args.epochs / elapsed:.2f} samples/s (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
