# The two commands of the README: `make serve` and `make test`.
.PHONY: serve test lint proto bootstrap

serve:
	./scripts/bootstrap.sh
	.venv/bin/kvmesh up

test:
	./scripts/bootstrap.sh --test
	./scripts/check.sh

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

proto:
	PYTHON=.venv/bin/python ./scripts/gen_proto.sh
