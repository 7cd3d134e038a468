"""LoRA adapter folders on disk: the manifest, its validation, and the atomic write."""
