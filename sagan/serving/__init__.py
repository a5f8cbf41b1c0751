"""Networks for serving: a checkpoint's generator with spectral norm folded into plain weights (folded), as an ONNX
file checked against PyTorch with onnxruntime (onnx_export)."""
