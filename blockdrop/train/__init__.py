"""Training loops: backbone pretraining, curriculum policy training, joint finetuning."""
