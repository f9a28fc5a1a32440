"""sparsify: the algorithms library (pruning, sparse training, quantization, kernels, evaluation).

Plain functions and small classes; it never imports prefect, mlflow or dvc.
"""
