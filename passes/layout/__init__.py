"""Layout normalization: turn channel-last (TensorFlow/Keras/TFLite-exported) graphs into NCHW
graphs by sinking Transposes through layout-agnostic ops until inverse pairs meet and cancel.

The pass thinks in *labels*: a tensor ``o`` is labeled ``(pre, perm)`` when ``o`` equals
``Transpose(pre, perm)``. Every Transpose labels its output; a layout-agnostic node whose inputs
are labeled can instead run on the ``pre`` tensors (its own axes, pads, scales and constants
permuted), and then labels its outputs; a Transpose of a labeled tensor composes the two
permutations and, for the inverse permutation, leaves the ``pre`` tensor itself. A labeled tensor
only needs a real Transpose where something that cannot take the other layout reads it (a Conv,
an op with no handler, a graph output). The op -> handler table (``HANDLERS``) knows, for each op,
how to run the node on transposed inputs and what its outputs' labels are.

The package, one module per job: ``perms`` (permutation algebra), ``handlers`` (the op ->
handler table), ``transposes`` (the graph's Transposes: queries, merging duplicates, io=nchw input
Transposes), ``analysis`` (labels, regions and the cost model that accepts them), ``rewrite``
(applying the accepted regions), ``nchw`` (the ``layout-nchw`` pass) and ``io`` (what
``layout-nchw(io=nchw)`` records about the model's inputs and outputs, for the callers that feed
and read the model).
"""
