"""How well a model does a task: its examples answered leave-one-out and scored as VQA answers are."""
