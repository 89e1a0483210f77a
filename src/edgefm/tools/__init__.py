"""The tools the stages are made of, each usable on its own model and data: the training loop,
COCO evaluation, ONNX export, INT8 quantization and QAT, the benchmark, instruction sets, pruning,
students, distillation, pseudo-labels, the search space and the bundle. No tool imports a stage.
"""
