"""The wire contract (llamadist.proto, generated code beside it by `make protos`) and the few
helpers both services share at the wire boundary: domain errors (`errors`), their mapping to gRPC
status codes (`status`) and the tensor codec (`codec`)."""
