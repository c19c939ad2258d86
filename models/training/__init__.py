"""Training: the shared loop, run settings, samples, pretraining, finish stages, exports and the train CLI.

Needs the ``train`` extra (torch). Trains what each family folder declares (:mod:`models.families.catalogue`) and
the segmenter and refiner (:mod:`.train_reference`).
"""
