"""What the services share that is not the wire contract (that is `protos/` itself: the .proto,
its codec, errors and their statuses, limits, sampling values).

- knobs.py: configuration, one declaration per knob; each service's config derives its flags.
- model_files.py: a model directory without torch: LlamaArgs, tensor index, fingerprint;
  default_model.py: where the default model lives on this host (the client makes it).
- model_family.py: which checkpoints our model code computes, and the refusal of the rest.
- submodel.py: a stage's own slice of a model (`llamadist model split`), layer-range helpers.
- security.py: TLS credentials, API keys and their interceptor; stage_auth.py: the stage key.
- serving.py, handlers.py, standard_services.py: building and running a gRPC server, health,
  reflection; step_link.py: the long-lived step stream between services; hop.py and
  hop_wire.py: the hop socket it runs on (frames, heartbeats, TLS, dialing a stage).
- transfer.py: what both ends of weights over the wire share; logs.py: service log formats.
"""
