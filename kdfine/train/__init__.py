"""Training: :mod:`kdfine.train.run` turns options and prepared data into networks, teachers and a
run record; :func:`kdfine.train.loop.fit` is the epoch loop; losses, optimizers, schedules, the
resume state, progress and the training strategies (FINE's applications) have a module each.
Torch-free at import of the package itself (the options read loss names from these sources)."""

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds; larger values would wrap silently
#: ``--bn-stats``: what happens to BatchNorm running statistics at the end of a run
#: (:mod:`kdfine.train.batchnorm`): re-estimated when they lag (auto), always (recompute), never (keep).
BN_STATS = ("auto", "recompute", "keep")
