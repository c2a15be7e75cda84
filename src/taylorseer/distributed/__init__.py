"""Beyond one device: taylorseer under diffusers' context parallelism (Ulysses, ring) and hybrid data x context
parallel layouts (docs/parallel.md).

- ``layout``: ``ContextParallel`` (degree, kind), ``make_layout`` (the DP x CP ``DeviceMesh``), ``enable``
  (``enable_parallelism`` over this rank's replica, after checks that refuse what cannot run), ``fail_fast``;
- ``vote``: the probe vote of gated policies (now ``taylorseer.runtime.vote``; the handle uses it), kept importable;
- ``flux``: ``ClassFluxPipeline``, the class-conditional FLUX pipeline the commands run, and the models by name.

This package imports nothing heavy itself; import the submodules.
"""
