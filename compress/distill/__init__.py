"""Knowledge distillation: losses, student construction, the teacher-output cache and the training loop.

The `distill` pass (compress/passes/distill.py) wires these together; each module stays usable alone."""
