"""A compact trainer: AdamW, warmup + cosine, clipping, bf16 on CUDA, evaluation, JSONL logs, LR sweeps."""

from linmix.train.trainer import (BucketedBatches, SweepResult, TrainConfig, Trainer, labelled_positions_loss,
                                  lr_at, lr_sweep, next_token_loss, param_groups)

__all__ = ["BucketedBatches", "SweepResult", "TrainConfig", "Trainer", "labelled_positions_loss", "lr_at",
           "lr_sweep", "next_token_loss", "param_groups"]
