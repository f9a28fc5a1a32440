"""Training: the mask-preserving trainer, distillation objectives, fine-tuning batches."""
