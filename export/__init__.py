"""Export to ONNX and sample the graph with onnxruntime. Installed as `minigpt.export`.

`minigpt.export.onnx_engine` imports no torch, so a machine with only
onnxruntime and numpy can sample an exported model; `minigpt.export.onnx_export`
(which needs torch) writes one.
"""
