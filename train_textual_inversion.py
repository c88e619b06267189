#!/usr/bin/env python
"""Drop-in for ppdiffusers' examples/textual_inversion/train_textual_inversion.py.

Accepts its command line unchanged and runs `textinv train` with it, e.g.

    python -u train_textual_inversion.py --pretrained_model_name_or_path=$MODEL \
        --train_data_dir=$DATA_DIR --learnable_property="object" --placeholder_token="<cat-toy>" \
        --initializer_token="toy" --resolution=512 --train_batch_size=1 \
        --gradient_accumulation_steps=4 --max_train_steps=3000 --learning_rate=5.0e-04 \
        --scale_lr --lr_scheduler="constant" --lr_warmup_steps=0 --seed 42 \
        --output_dir="textual_inversion_cat"
"""

import sys
from pathlib import Path

try:
    from textinv.cli import train_script_main
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from textinv.cli import train_script_main

if __name__ == "__main__":
    sys.exit(train_script_main())
