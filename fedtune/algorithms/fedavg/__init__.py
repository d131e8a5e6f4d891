"""FedAvg (full parameters) and FedIT (LoRA): server.py (the weighted mean of the trainable
tensors), device.py (local backprop; the tensor-sending device round the other tensor methods
reuse), wire.py (messages), method.py (the registry rows)."""
