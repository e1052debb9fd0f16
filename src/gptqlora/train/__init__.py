"""LoRA training: the loop and its one optimizer step, the schedule, resumable checkpoints and the loss curve."""

from gptqlora.train.loop import train_lora
from gptqlora.train.plot import plot_loss_curve
from gptqlora.train.run import check_only_lora_trainable, trainable_report
from gptqlora.train.schedule import count_total_steps, get_lr
from gptqlora.train.state import (TrainState, latest_checkpoint, load_checkpoint, resume_checkpoint,
                                  save_checkpoint)

__all__ = ["TrainState", "check_only_lora_trainable", "count_total_steps", "get_lr", "latest_checkpoint",
           "load_checkpoint", "plot_loss_curve", "resume_checkpoint", "save_checkpoint", "train_lora",
           "trainable_report"]
