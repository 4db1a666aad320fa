"""Running a Core ML export (`mcq export --format coreml`) from Python: `runtime.CoremlMiniCPMV` drives its packages
as the Swift app does, through Core ML itself on macOS 15+ and elsewhere through `interpreter`, a numpy interpreter
of the MIL ops mcq's packages contain (the checker that lets Linux compare a saved package with the torch model)."""
