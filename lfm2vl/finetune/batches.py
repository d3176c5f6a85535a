"""Training samples, their batches, and the order batches come in.

A `Sample` is one checked conversation: its token ids, the loss mask (True on assistant tokens and their end
token) and what re-loads its images (a path, URL bytes, a data: string, or a reader of a dataset row): pixels are
computed by `collate` when the batch is built, never kept for the whole dataset.

`Order` decides which samples form each batch, per epoch, from (seed, epoch) alone: samples are grouped by
(vision units, length) so a batch has similar shapes, the batches are shuffled, and each global batch
(batch_size x world_size samples) is cut into one slice per rank. The global batches do not depend on how they
are shared out, so N ranks with batch_size B see the batches of one process with batch_size N*B.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

IGNORE = -100  # label of a position that is not trained (CrossEntropyLoss's ignore_index)
WINDOW = 50  # batches per sorting window: samples are sorted by length within windows of this many batches


@dataclass(frozen=True, eq=False)
class Sample:
    """One training conversation. `where` names its row ("train.jsonl line 12"); ids (T,) int64 and loss_mask (T,)
    bool are the processor's render_for_training output; n_units counts its vision units (tiles + thumbnails, or
    1 for an unsplit image) for grouping; `images` is a tuple of sources load_image reads, or a function returning
    them (a dataset row read again)."""
    where: str
    ids: torch.Tensor
    loss_mask: torch.Tensor
    n_images: int
    n_units: int
    images: tuple | Callable[[], list] = ()

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    def load_images(self) -> list:
        """The sample's images, in order, as load_image inputs."""
        out = list(self.images() if callable(self.images) else self.images)
        if len(out) != self.n_images:
            raise ValueError(f"{self.where}: expected {self.n_images} images, got {len(out)} when reading it again")
        return out


@dataclass
class Batch:
    """Model inputs and targets of one batch. labels[:, t] is the token trained at position t (the next token,
    already shifted) or -100; n_tokens counts the trained positions."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    pixel_attention_mask: torch.Tensor | None
    spatial_shapes: torch.Tensor | None
    n_tokens: int
    n_samples: int

    def model_inputs(self) -> dict:
        """Keyword arguments of the model's forward / hidden_states."""
        return {"input_ids": self.input_ids, "pixel_values": self.pixel_values,
                "pixel_attention_mask": self.pixel_attention_mask, "spatial_shapes": self.spatial_shapes,
                "attention_mask": self.attention_mask}

    def to(self, device=None, dtype=None) -> "Batch":
        """Tensors moved to `device`; `dtype` applies to pixel_values only."""
        def mv(x, dt=None):
            return None if x is None else x.to(device=device, dtype=dt)
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.labels), mv(self.pixel_values, dtype),
                     mv(self.pixel_attention_mask), mv(self.spatial_shapes), self.n_tokens, self.n_samples)


def collate(samples: Sequence[Sample], processor, pad_id: int | None = None, **knobs) -> Batch:
    """Samples -> Batch: ids right-padded with `pad_id` (default: the tokenizer's pad id, else 0), next-token labels
    where the next token is trained, and the pixel inputs of all images in sample order (unpadded patches). `knobs`
    must be the image knobs the samples were made with: a mismatch is caught by counting image tokens."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if pad_id is None:
        pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    B, T = len(samples), max(s.length for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((B, T), dtype=torch.int64)
    labels = torch.full((B, T), IGNORE, dtype=torch.int64)
    for i, s in enumerate(samples):
        n = s.length
        input_ids[i, :n] = s.ids
        attention_mask[i, :n] = 1
        target = s.loss_mask[1:]
        labels[i, :n - 1] = torch.where(target, s.ids[1:], IGNORE)
    images = [im for s in samples for im in s.load_images()]
    pixels = {"pixel_values": None, "pixel_attention_mask": None, "spatial_shapes": None}
    if images:
        pixels, _ = processor.process_images(images, pad_patches=False, **knobs)
        o = processor.options(**knobs)
        features = int((pixels["spatial_shapes"] // o.downsample_factor).prod(dim=1).sum())
        placeholders = int((input_ids == processor.image_token_id).sum())
        if features != placeholders:
            raise ValueError(f"the batch's ids hold {placeholders} image tokens but its images give {features} "
                             "features: collate needs the image knobs the samples were made with")
    return Batch(input_ids, attention_mask, labels, pixels["pixel_values"], pixels["pixel_attention_mask"],
                 pixels["spatial_shapes"], int((labels != IGNORE).sum()), B)


class Order:
    """The batches of every epoch, deterministic from (seed, epoch), and this rank's position in them.

    Per epoch: each group of samples with the same n_units is shuffled, sorted by length within windows of WINDOW
    global batches, and cut into global batches of batch_size x world_size; the leftovers of all groups, sorted by
    (n_units, length), make the last few global batches; then the global batches are shuffled. Rank r takes the
    r-th of world_size near-equal contiguous slices of each global batch. Only the last global batch of an epoch
    may be short; it is kept when it has at least world_size samples (each rank gets one or more) and dropped
    otherwise, so every rank gets batches_per_epoch batches (a dropped sample is seen in other epochs).

    Iterating yields this rank's remaining batches of the current epoch (lists of sample indices) and moves to the
    next epoch at its end; next_batch() does the same one batch at a time, across epochs. state_dict() /
    load_state_dict() carry (epoch, position) so a resumed run continues at the same batch."""

    def __init__(self, samples: Sequence, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r}: expected an int >= 1")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}: expected an int in [0, {world_size})")
        self.keys = [(s.n_units, s.length) if isinstance(s, Sample) else (int(s[0]), int(s[1])) for s in samples]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, int(seed), rank, world_size
        g = batch_size * world_size
        if len(self.keys) < world_size:
            raise ValueError(f"{len(self.keys)} samples cannot be shared out over {world_size} ranks")
        self.batches_per_epoch = len(self.keys) // g + (len(self.keys) % g >= world_size)
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (sample indices), before they are shared out over the ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        g = self.batch_size * self.world_size
        groups: dict[int, list[int]] = {}
        for i, (units, _) in enumerate(self.keys):
            groups.setdefault(units, []).append(i)
        batches, leftovers = [], []
        for units in sorted(groups):
            idx = [groups[units][j] for j in rng.permutation(len(groups[units]))]
            for w in range(0, len(idx), g * WINDOW):
                window = sorted(idx[w:w + g * WINDOW], key=lambda i: self.keys[i][1])  # stable: ties stay shuffled
                full = len(window) // g * g
                batches += [window[k:k + g] for k in range(0, full, g)]
                leftovers += window[full:]
        leftovers.sort(key=lambda i: self.keys[i])
        batches += [leftovers[k:k + g] for k in range(0, len(leftovers), g)]
        if batches and len(batches[-1]) < self.world_size:
            batches.pop()
        return [batches[j] for j in rng.permutation(len(batches))]

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch` (lists of sample indices)."""
        if self._cache is None or self._cache[0] != epoch:
            mine = []
            for b in self.global_batches(epoch):
                lo, hi = len(b) * self.rank // self.world_size, len(b) * (self.rank + 1) // self.world_size
                mine.append(b[lo:hi])
            self._cache = (epoch, mine)
        return self._cache[1]

    def next_batch(self) -> list[int]:
        """This rank's next batch; after an epoch's last batch the position moves to the next epoch."""
        out = self.batches(self.epoch)[self.position]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return out

    def __iter__(self):
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "n_samples": len(self.keys)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the batch `state` points to; a state from a different seed, batch size, number of ranks or
        number of samples is a ValueError naming the difference."""
        for name, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("world_size", self.world_size),
                           ("n_samples", len(self.keys))):
            if name in state and state[name] != mine:
                raise ValueError(f"the saved data order has {name}={state[name]!r} but this run has {mine!r}; "
                                 "resume with the same data, batch size, seed and number of processes")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"saved data position (epoch {epoch}, batch {position}) is out of range "
                             f"({self.batches_per_epoch} batches per epoch)")
        self.epoch, self.position = epoch, position
