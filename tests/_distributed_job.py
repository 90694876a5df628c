"""Run under `accelerate launch --multi_gpu --num_processes 2`: record each rank's samples, then train."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from specialists.config import load_config
from specialists.data import ShardIndex, train_batches
from specialists.stages.generalist import run as train_generalist

config, out, *overrides = sys.argv[1:]
cfg = load_config(config, overrides)
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
index = ShardIndex.load(cfg.data.shards)
digests = [hashlib.sha1(image.numpy().tobytes()).hexdigest() + f":{int(label)}"
           for images, labels in train_batches(index, cfg.data, epoch=0, seed=cfg.seed, rank=rank, world_size=world)
           for image, label in zip(images, labels, strict=True)]
Path(out, f"rank{rank}.json").write_text(json.dumps({"world": world, "samples": digests,
                                                     "threads": torch.get_num_threads()}))
train_generalist(cfg, force=True)
accelerator.end_training()  # destroy the process group before exit (pytorch/pytorch#190489)
