#!/usr/bin/env python3
"""Train or evaluate a fast-reid model with the project's regularizers.

fast-reid's conventions: --config-file, --eval-only, --resume, --num-gpus (processes per machine;
CPU processes with MODEL.DEVICE cpu), --num-machines, --machine-rank, --dist-url, then KEY VALUE
config overrides. Under torchrun, start one process per GPU without --num-gpus.
"""
from adaptive_l2.cli import main_from_command_line

if __name__ == "__main__":
    main_from_command_line()
