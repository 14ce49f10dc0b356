"""Steps 5-6: model access, LoRA modules, data, the loop, the LR probe and export."""
