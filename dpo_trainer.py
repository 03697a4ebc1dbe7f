"""The DPO trainer of dpo_train.py (and bench.py's dpo case): TRL's DPOTrainer over pairs tokenised by
dpo_train.encode_pairs, reference in-model (the adapter disabled, or a frozen copy of a continued adapter)."""
from __future__ import annotations

from training import log_callbacks, trl_config, trl_kwargs


def dpo_config(args):
    """TRL's DPOConfig: the shared training arguments plus beta and the loss (README: beta goes in the config)."""
    from trl import DPOConfig
    return trl_config(DPOConfig, trl_kwargs(args, args.save_dir), beta=args.beta, loss_type=list(args.loss_type),
                      loss_weights=args.loss_weights, label_smoothing=args.label_smoothing, logging_first_step=True)


def build_trainer(args, model, tok, dataset, peft_config=None, callbacks=None, config=None, eval_dataset=None):
    """A DPOTrainer over a dataset from encode_pairs (tokenised already), reference in-model (ref_model=None).
    `config` (a DPOConfig) defaults to dpo_config(args); `callbacks` to the run-directory logs."""
    from compat import PretokenizedDPOTrainer
    return PretokenizedDPOTrainer(model=model, ref_model=None, args=config or dpo_config(args), train_dataset=dataset,
                                  eval_dataset=eval_dataset, processing_class=tok, peft_config=peft_config,
                                  callbacks=log_callbacks(args) if callbacks is None else callbacks)
