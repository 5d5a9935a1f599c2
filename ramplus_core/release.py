"""Where the released RAM++ checkpoint comes from, without importing torch.

The CLI's help and the job's error messages quote these; they live apart from
checkpoint.py so `--help` does not pay for importing torch and timm.
"""

RELEASED_NAME = "ram_plus_swin_large_14m.pth"
RELEASED_URL = "https://huggingface.co/xinyu1205/recognize-anything-plus-model/resolve/main/ram_plus_swin_large_14m.pth"
RELEASED_BYTES = 3_010_210_801
GET_IT = (
    f"Download the released RAM++ checkpoint ({RELEASED_BYTES:,} bytes) once from {RELEASED_URL} "
    f"and pass its path or URL with --checkpoint (see README, 'Getting the checkpoint')."
)
