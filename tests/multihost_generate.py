"""Run by tests/test_multihost.py as each of N processes (or alone): greedy decoding of a random tiny model on a
mesh over every device of the job; process 0 writes the tokens to argv[1] as JSON. (A mesh in one process equals one
device: tests/test_sharding.py.)"""
import json
import sys

from zaya.train.distributed import maybe_initialize

maybe_initialize()

import jax  # noqa: E402

import zaya  # noqa: E402
from zaya import sharding  # noqa: E402
from zaya.api import Model  # noqa: E402
from zaya.model.params import init  # noqa: E402

c = zaya.preset("tiny", num_layers=1)
params = init(c, jax.random.PRNGKey(0), std=0.3)  # the same on every process (same key)
mesh = sharding.make_mesh(data=2, tensor=2)
placed = jax.tree.map(sharding.put_global, params, sharding.param_shardings(c, mesh))
model = Model(c, placed, mesh=mesh)
prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
SAMPLERS = (dict(sampler="ar"), dict(sampler="single_forward", loop="device"))  # host loop, device loop
out = {kw["sampler"]: zaya.generate(model, prompts, max_new_tokens=8, block_size=4, **kw).tokens for kw in SAMPLERS}
if jax.process_index() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
