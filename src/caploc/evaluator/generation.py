"""Greedy generation under ablation masks: caploc's own decoding loop, rows leaving the batch as they finish,
all masks of an item chunk sharing one left-padded layout and the few-shot prefix computed once per mask."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from caploc.evaluator.batches import pad_batch
from caploc.evaluator.requests import Requests
from caploc.evaluator.runner import ModelRunner, returned_cache
from caploc.masks import Masks

GENERATE_ROWS = 64  # rows per generate() call: bounded by the KV cache of long generations


class _RoomyLayer(DynamicLayer):
    """A full-attention cache layer whose K/V sit at the front of buffers with room for the tokens still to be
    written: a decode step writes in place, where DynamicLayer concatenates the whole cache anew (35% of an
    8-shot GSM8K generation's time on Qwen2.5-Coder-0.5B). `keys`/`values` are views of the filled part, so
    the layer reads as a DynamicLayer to the model."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.room = room
        self.lazy_initialization(keys, values)
        self._length = keys.shape[-2]
        self._buffers = tuple(self._buffer(x, self._length + room) for x in (keys, values))
        self._views()

    @staticmethod
    def _buffer(x: torch.Tensor, capacity: int) -> torch.Tensor:
        """`x` at the front of a buffer of `capacity` positions."""
        out = x.new_empty(*x.shape[:-2], capacity, x.shape[-1])
        out[..., :x.shape[-2], :] = x
        return out

    def _views(self) -> None:
        self.keys, self.values = (b[..., :self._length, :] for b in self._buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self._length + new > self._buffers[0].shape[-2]:  # out of room: grow once more by `room`
            self._buffers = tuple(self._buffer(x, self._length + new + self.room) for x in (self.keys, self.values))
        for buffer, states in zip(self._buffers, (key_states, value_states)):
            buffer[..., self._length:self._length + new, :] = states
        self._length += new
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._buffers = tuple(b[indices] for b in self._buffers)
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._buffers = tuple(b.repeat_interleave(repeats, dim=0) for b in self._buffers)
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # its checks; then the same cut of the filled part
        self._length = self.keys.shape[-2]
        self._views()


def _with_room(cache, room: int):
    """`cache` with its full-attention layers given room for `room` more tokens (other layer kinds, and caches
    without per-layer objects, are left as they are)."""
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or ()):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            layers[i] = _RoomyLayer(layer.keys, layer.values, room)
    return cache


class Generator(ModelRunner):
    def masks_per_pass(self, requests: Requests) -> int:
        """Rows = masks x items; about GENERATE_ROWS rows per call."""
        return max(1, GENERATE_ROWS // min(len(requests.items), GENERATE_ROWS))

    @torch.no_grad()
    def generate(self, requests: Requests, masks: Masks, max_new_tokens: int) -> list[list[str]]:
        """What the model writes for every item under every mask, cut at the task's stop strings:
        texts[m][i]. Items that share a few-shot prefix share its computation: the prefix runs once per mask
        and its KV cache is copied to the rows of every item (the items' own tokens follow it, padded
        between prefix and item so that positions are the unpadded ones)."""
        tok = self.lm.tokenizer
        task = requests.task
        mask = masks.tensor()
        n_masks, items = mask.shape[0], requests.items
        per_chunk = max(1, min(len(items), GENERATE_ROWS // n_masks))
        texts = [[""] * len(items) for _ in range(n_masks)]
        prompts = requests.prompts
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        if task.stop:
            gen_kwargs.update(stop_strings=list(task.stop), tokenizer=tok)
        for prefix, members in requests.generation_groups:
            for start in range(0, len(members), per_chunk):
                idx = members[start:start + per_chunk]
                new = self._generate_rows(mask, [prompts[i] for i in idx], len(prefix), gen_kwargs)
                decoded = tok.batch_decode(new, skip_special_tokens=True)
                for m in range(n_masks):
                    for r, i in enumerate(idx):
                        texts[m][i] = task.cut_at_stop(decoded[m * len(idx) + r])
        return texts

    def _generate_rows(self, mask: torch.Tensor, prompts: list[list[int]], shared: int,
                       gen_kwargs) -> list[list[int]]:
        """Greedy continuations of `prompts` under every mask (rows mask-major); the first `shared` tokens,
        common to every prompt, are computed once per mask."""
        n_masks, n = mask.shape[0], len(prompts)
        cache = None
        if shared:
            prefix = torch.tensor([prompts[0][:shared]], device=self.device).repeat(n_masks, 1)
            with self.applied(mask.to(self.device)):
                cache = returned_cache(self.lm.model(input_ids=prefix, use_cache=True, logits_to_keep=1))
            cache.batch_repeat_interleave(n)
            self.stats.tokens += shared * n_masks
            suffix, suffix_attn = pad_batch([p[shared:] for p in prompts], gen_kwargs["pad_token_id"], side="left")
            ids = torch.cat([prefix[:1].cpu().repeat(n, 1), suffix], dim=1)  # padding sits between prefix and item
            attn = torch.cat([torch.ones(n, shared, dtype=suffix_attn.dtype), suffix_attn], dim=1)
        else:
            ids, attn = pad_batch(prompts, gen_kwargs["pad_token_id"], side="left")
        return self._greedy(ids.repeat(n_masks, 1).to(self.device), attn.repeat(n_masks, 1).to(self.device),
                            mask.to(self.device).repeat_interleave(n, dim=0), gen_kwargs, cache)

    def _greedy(self, ids: torch.Tensor, attn: torch.Tensor, row_mask: torch.Tensor, gen_kwargs: dict,
                cache=None) -> list[list[int]]:
        """Greedy decoding, row by row exact, that drops each row from the batch as soon as it is finished
        (end of sequence, or one of the task's stop strings written), together with its KV cache rows and its
        row of the ablation mask, instead of running every row to max_new_tokens as `generate()` does.
        `cache` holds the K/V of the first positions of `ids` (a shared prefix), which are then not rerun."""
        tok, pad = self.lm.tokenizer, gen_kwargs["pad_token_id"]
        stops = list(gen_kwargs.get("stop_strings") or ())
        eos = self.lm.model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        n_rows = ids.shape[0]
        written: list[list[int]] = [[] for _ in range(n_rows)]
        alive = torch.arange(n_rows, device=ids.device)
        positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
        start = cache.get_seq_length() if cache is not None else 0
        step_ids, step_pos = ids[:, start:], positions[:, start:]
        self.stats.tokens += int(attn[:, start:].sum())
        for step in range(gen_kwargs["max_new_tokens"]):
            with self.applied(row_mask[alive]):
                out = self.lm.model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos,
                                    use_cache=True, logits_to_keep=1, **{self.cache_name: cache})
            cache = returned_cache(out)
            if step == 0:  # the prompt is in: room for the tokens still to be written
                cache = _with_room(cache, gen_kwargs["max_new_tokens"])
            next_ids = out.logits[:, -1].argmax(-1)
            self.stats.tokens += len(alive)
            keep = []
            for j, (row, token) in enumerate(zip(alive.tolist(), next_ids.tolist())):
                written[row].append(token)
                # a stop string is caught the step it is completed, so the last few tokens are enough to look at
                finished = token in eos or any(s in tok.decode(written[row][-16:], skip_special_tokens=True)
                                               for s in stops)
                if not finished:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=ids.device)
                cache.batch_select_indices(index)
                alive, attn, next_ids = alive[index], attn[index], next_ids[index]
                positions = positions[index]
            attn = torch.cat([attn, attn.new_ones(len(alive), 1)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            step_ids, step_pos = next_ids[:, None], positions[:, -1:]
        return [[t for t in row if t != pad] for row in written]
