"""Files that trainers write and readers load (LoRA: diffusers and kohya/A1111 layouts)."""
