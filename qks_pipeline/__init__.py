"""QKS (Query-Based Knowledge Sharing) open-vocabulary multi-label classification on cached CLIP features.

The method, in the order the data flows (docs/design.md explains each step and its sources):

Stage one, once per image:
    backbone    the frozen CLIP tower: visual tokens after ln_post, label embeddings from the prompt pool
    images      decoding (robust to odd files); augment: the reference's training views
    extract     tokens of every image into a store; the label vocabulary into a label store
    cache       the stores (Zarr v3, sharded, checksummed) and what stage two reads from them
Stage two, from the cache only:
    shards      reading samples straight from the shard files; loader: random batches at disk speed
    model       the query tokens, the Q-Former (knowledge extraction), the projection (knowledge sharing)
    losses      ASL, BCE and their masked variants; train: the recipe (ddp: on several processes)
    scoring     logits of a test store in float32; metrics: AP and P/R/F1@K; evaluate: ZSL and GZSL reports
    checkpoint  a trained head on disk
Using a trained head:
    predict     tagging new images with any label list; report: the HTML page
Around them: config (params.yaml's sections), manifest and importers (datasets), reference (the authors'
checkpoints), distributed (stage one on dask), storage and atomic (where and how files are written), h5io, plots,
devices, errors. The command line is `cli/`, the only place that knows click.
"""
