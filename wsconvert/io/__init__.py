"""Everything wsconvert reads from or writes to disk.

* :mod:`~wsconvert.io.safe`: ``torch.load`` under the trust rules (``weights_only``, allowed
  classes, the globals an untrusted file would import).
* :mod:`~wsconvert.io.spec`: ``MODULE:FACTORY`` specs.
* :mod:`~wsconvert.io.state`: state dicts (wrappers, key prefixes, strict loading).
* :mod:`~wsconvert.io.arch`: the architecture record a model carries for its checkpoint.
* :mod:`~wsconvert.io.wsfile`: the wsconvert checkpoint format; loading any checkpoint form.
* :mod:`~wsconvert.io.inputs`: input shapes and sample-input files.
* :mod:`~wsconvert.io.images`: a folder of images as one normalized tensor (recovery data).
* :mod:`~wsconvert.io.atomic`: atomic writes and output sets committed together.
"""
