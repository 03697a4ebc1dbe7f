"""The KD trainer of kd_train.py: TRL's SFTTrainer with a token-level divergence to a frozen teacher.

Imports TRL at import time: import it inside functions (kd_train.build_trainer does).
"""
from __future__ import annotations

import random

import torch
from trl import SFTTrainer
from trl.models import unwrap_model_for_generation

from kd_cache import cached_kd_terms
from kd_losses import kd_terms


class WithRowIds:
    """The trainer's collator, plus each example's "kd_row" (its index in the KD file) as a tensor."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        out = self.collate([{k: v for k, v in e.items() if k != "kd_row"} for e in examples])
        out["kd_row"] = torch.tensor([e["kd_row"] for e in examples])
        return out


class KDTrainer(SFTTrainer):
    """Without a teacher it is SFTTrainer itself (fused chunked CE). With one, compute_loss runs kd_losses.kd_terms
    (one backbone pass per model, chunked CE and divergence on the completion tokens) and training_step makes the
    on-policy batches. `kd` holds the KD flags (kd_loss, jsd_beta, temperature, alpha, lmbda, max_new_tokens, seed);
    full_logits: the unchunked reference loss (benchmark baseline only).

    The loss is weighted per token over the accumulated batch, as SFT's is (transformers' num_items_in_batch, its
    fix for gradient accumulation): each micro-batch contributes its token sum divided by the completion tokens of
    the whole accumulated batch, so long answers count as much per token as in one big batch. On-policy batches
    (sampled completions, whose token count the loop cannot know in advance) stay token means divided by the
    accumulation steps."""

    def __init__(self, *a, kd, teacher=None, vocab=None, full_logits: bool = False, cache=None, xtok=None, **kw):
        super().__init__(*a, **kw)
        self.kd, self.teacher, self.vocab, self.full_logits, self.cache = kd, teacher, vocab, full_logits, cache
        self.xtok = xtok  # an xtok_kd.CrossVocab: the teacher has another tokenizer (kd_train.py --cross_tokenizer)
        self.on_policy = False
        self.rng = random.Random(kd.seed)
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        if teacher is not None or cache is not None:
            self.model_accepts_loss_kwargs = True  # compute_loss weights by num_items_in_batch itself (below)
        if cache is not None:  # each batch says which rows it holds, to look their cached targets up
            self.data_collator = WithRowIds(self.data_collator)
        if xtok is not None:  # each batch carries the teacher's own sequences and the aligned positions
            from xtok_kd import PairCollator
            self.data_collator = PairCollator(self.data_collator, xtok.teacher_pad)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.on_policy = self.teacher is not None and self.kd.lmbda > 0 and self.rng.random() < self.kd.lmbda
        if self.on_policy:
            inputs = self.student_completions(model, inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def student_completions(self, model, inputs):
        """GKD's on-policy batch: each row's prompt (left-padded) continued by a student sample."""
        ids, labels, att = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
        starts = [int((lab != -100).nonzero()[0]) if (lab != -100).any() else int(a.sum())
                  for lab, a in zip(labels, att)]
        width, pad = max(starts), self.processing_class.pad_token_id
        prompts = ids.new_full((len(starts), width), pad)
        pmask = torch.zeros_like(prompts)
        for i, s in enumerate(starts):
            prompts[i, width - s:], pmask[i, width - s:] = ids[i, :s], 1
        with unwrap_model_for_generation(model, self.accelerator,
                                         gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as m:
            was = m.training
            m.eval()
            seq = m.generate(input_ids=prompts, attention_mask=pmask, max_new_tokens=self.kd.max_new_tokens,
                             do_sample=True, temperature=self.kd.temperature, top_k=0, top_p=1.0,
                             pad_token_id=pad, use_cache=True)
            m.train(was)
            eos = m.generation_config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or [self.processing_class.eos_token_id]),
                           device=seq.device)
        comp = seq[:, width:]
        ended = torch.isin(comp, eos)
        first = torch.where(ended.any(1), ended.int().argmax(1), comp.shape[1])
        cmask = (torch.arange(comp.shape[1], device=seq.device)[None] <= first[:, None]).long()
        att = torch.cat([pmask, cmask], 1)
        labels = seq.masked_fill(att == 0, -100)
        labels[:, :width] = -100
        return {"input_ids": seq, "attention_mask": att, "labels": labels,
                "position_ids": (att.cumsum(1) - 1).clamp(min=0)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None and self.cache is None:  # sequence-level KD: exactly SFTTrainer's loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        kd = self.kd
        mode = "train" if self.model.training else "eval"
        on_policy = self.on_policy and mode == "train"
        unwrapped = self.accelerator.unwrap_model(model)
        if self.cache is not None:  # the teacher's cached top-k (kd_cache.py): no teacher in memory
            inputs = dict(inputs)
            fn, args, kw = cached_kd_terms, (unwrapped, inputs, self.cache, inputs.pop("kd_row").tolist()), \
                dict(temperature=kd.temperature)
        elif self.xtok is not None:  # another tokenizer: the divergence on the aligned positions (xtok_kd.py)
            from xtok_kd import xtok_terms
            fn, args, kw = xtok_terms, (unwrapped, self.teacher, inputs, self.xtok), \
                dict(temperature=kd.temperature, with_ce=kd.alpha < 1)
        else:
            fn, args = kd_terms, (unwrapped, self.teacher, inputs)
            kw = dict(kd_loss=kd.kd_loss, jsd_beta=kd.jsd_beta, temperature=kd.temperature, vocab=self.vocab,
                      with_ce=not on_policy and kd.alpha < 1, full_logits=self.full_logits)
        if model is unwrapped:
            t = fn(*args, **kw)
        else:  # DDP/FSDP: run through the wrapper's forward so its hooks fire (as TRL's DistillationTrainer)
            from compat import forward_through_wrapper
            t = forward_through_wrapper(model, unwrapped, fn, *args, **kw)
        ce = t["ce"] if t["ce"] is not None else torch.zeros((), device=t["kd"].device)
        div = kd.temperature ** 2 * t["kd"]  # Hinton et al. 2015: soft-target gradients keep the CE's scale
        loss = div if on_policy else (1 - kd.alpha) * ce + kd.alpha * div
        if mode == "train" and num_items_in_batch is not None:  # else Trainer divides by the accumulation steps
            if on_policy:
                loss = loss / self.current_gradient_accumulation_steps
            else:  # this micro-batch's share of the accumulated batch's token mean
                loss = loss * t["tokens"] / num_items_in_batch
        m = self._metrics[mode]
        m["kd_loss"].append(t["kd"].item())
        m["on_policy"].append(float(on_policy))
        if "aligned" in t:
            m["aligned_share"].append(t["aligned"] / max(t["tokens"], 1))
        if t["entropy"] is not None:
            m["entropy"].append(t["entropy"])
        if t["ce"] is not None:
            m["ce_loss"].append(t["ce"].item())
            m["mean_token_accuracy"].append(t["accuracy"])
        return (loss, {"loss": loss}) if return_outputs else loss  # evaluation reads the outputs as a dict


def build_trainer(args, model, tok, dataset, teacher=None, vocab=None, callbacks=None, config=None,
                  full_logits=False, cache=None, eval_dataset=None, xtok=None):
    """TRL's SFTTrainer with the KD loss: without a teacher it is SFTTrainer itself (fused chunked CE); with one,
    compute_loss runs kd_losses.kd_terms (one backbone pass per model, chunked CE and divergence on the completion
    tokens) and training_step makes the on-policy batches. `args` needs the KD flags (kd_loss, jsd_beta,
    temperature, alpha, lmbda, max_new_tokens, seed); `config` (an SFTConfig) defaults to the training flags'.
    full_logits: the unchunked reference loss (benchmark baseline only). cache: a kd_cache.TeacherCache instead of
    a teacher (the dataset then has a "kd_row" column). xtok: an xtok_kd.CrossVocab (the teacher has another
    tokenizer; the dataset then has the teacher's side and the alignment, xtok_kd.encode_pairs)."""
    from trl import SFTConfig

    from training import trl_config, trl_kwargs
    # a cached teacher's targets are found by row, a cross-tokenizer teacher's sequences and the alignment sit in
    # columns of their own: keep those columns, which no model forward takes
    config = config or trl_config(SFTConfig, {**trl_kwargs(args, args.save_dir),
                                              **({"remove_unused_columns": False} if cache or xtok else {})})
    return KDTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=eval_dataset,
                     processing_class=tok, callbacks=callbacks,
                     kd=args, teacher=teacher, vocab=vocab, full_logits=full_logits, cache=cache, xtok=xtok)
