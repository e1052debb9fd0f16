"""LoRA training: the schedule, the loop, resumable checkpoints and the loss curve."""

from gptqlora.train.loop import (NonFiniteLossError, check_only_lora_trainable, resolve_bf16, seed_everything,
                                 train_lora, trainable_report)
from gptqlora.train.plot import plot_loss_curve
from gptqlora.train.schedule import count_total_steps, get_lr
from gptqlora.train.state import (TrainState, latest_checkpoint, load_checkpoint, resume_checkpoint,
                                  save_checkpoint)

__all__ = ["NonFiniteLossError", "TrainState", "check_only_lora_trainable", "count_total_steps", "get_lr",
           "latest_checkpoint", "load_checkpoint", "plot_loss_curve", "resolve_bf16", "resume_checkpoint",
           "save_checkpoint", "seed_everything", "train_lora", "trainable_report"]
