"""Making model A smaller: structured pruning and knowledge distillation (issue: model B)."""
