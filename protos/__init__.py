"""The wire contract: llamadist.proto (its generated code beside it, by `make protos`), the tensor
codec (`codec`), domain errors (`errors`) and their gRPC status codes (`status`), input limits
(`limits`) and sampling values (`sampling`). What the services share besides the wire lives in
`protos.shared` (its docstring maps it: configuration, model files, security, serving, logs)."""
