"""SAM post-processing: connected regions of the coarse map as prompts, SAM masks mapped back.

`refine.sam_refine.sam_refine` refines a coarse segmentation; `refine.components.split_regions`
splits it into regions. Both come in two implementations with the same output: ``original``
(Trident's reference, step for step) and ``optimized`` (the default). The function is not
re-exported here: its name would shadow the `sam_refine` submodule.
"""
