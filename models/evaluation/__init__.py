"""Judging the models as served: statistics (:mod:`.stats`), reports (:mod:`.report`), plots, model cards and the
``breastai evaluate`` command (:mod:`.command`). Uses ``models.inference``; never trains."""
