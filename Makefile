# fieldreid's front door. `make demo` sets everything up and runs the main job; `make test` runs the suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SHARED ?= ../shared
# torch/torchvision pinned to the builds that lie on this machine's disk (a CUDA build that runs on the CPU).
# On a Jetson use NVIDIA's wheels instead: make install TORCH_SPEC="" after installing them.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= train,server,sync,review,dev

# Never reach a model hub, never write into $HOME.
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := False
export YOLO_CONFIG_DIR := $(CURDIR)/.cache/ultralytics
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib

.PHONY: install models demo test bench bench-train lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install -q $(TORCH_SPEC); fi
	$(PIP) install -q -e '.[$(EXTRAS)]'
	touch $@

# The embedder's default open-set thresholds are chosen on the nyala *train* animals (never the test split
# they are judged on) when the shared data is there; without it the model says it is uncalibrated.
THRESHOLDS_DATA := $(SHARED)/data/reid/nyala/metadata.csv
models: install
	$(VENV)/bin/fieldreid models \
	  $$( [ -f $(SHARED)/weights/yolov5n-coco.pt ] && echo --yolov5 $(SHARED)/weights/yolov5n-coco.pt ) \
	  $$( [ -f $(THRESHOLDS_DATA) ] && echo --thresholds-from $(THRESHOLDS_DATA) --split train )

demo: models
	$(VENV)/bin/fieldreid doctor
	rm -rf demo && mkdir -p demo/cameras
	@echo "== 1. a camera card: three stations with bursts (EXIF times), plus a corrupt file and a video"
	cp -rp $(SHARED)/data/camtrap/camtrapr-stations/. demo/cameras/
	cp -p $(SHARED)/data/camtrap/animl-southwest/error_img.JPG demo/cameras/StationA/
	cp -p $(SHARED)/data/camtrap/animl-southwest/error_vid.mp4 demo/cameras/StationC/
	@echo "== 2. the main job: fieldreid watch --once (detect, crop, embed, decide per burst, record)"
	$(VENV)/bin/fieldreid watch demo/cameras --gallery demo/field.db --out demo/watch --once --settle 0
	@echo "== 3. fieldreid report: Camtrap DP package + HTML review page"
	$(VENV)/bin/fieldreid report demo/watch --camtrap-dp demo/camtrap-dp --html demo/report.html --utc-offset +02:00
	@echo "== 4. the lab side: enrol known zebras, calibrate open-set thresholds, identify new photos"
	$(VENV)/bin/fieldreid enroll $(SHARED)/data/reid/zebra/metadata.csv --split database --crops --gallery demo/zebra.db
	$(VENV)/bin/fieldreid calibrate $(SHARED)/data/reid/zebra/metadata.csv --split database --crops --verify --gallery demo/zebra.db
	$(VENV)/bin/fieldreid identify $(SHARED)/data/reid/zebra/images/query --crops --gallery demo/zebra.db --out demo/decisions.csv
	@echo
	@echo "Where to look (all in demo/):"
	@echo "  report.html                    open in a browser: each new/uncertain animal beside its best matches"
	@echo "  watch/sightings.csv            one row per animal: camera, time, burst, decision, identity, score"
	@echo "  watch/images.csv               one row per file, failures with their reason (error_img.JPG, the video)"
	@echo "  watch/detections.json          MegaDetector batch format (Timelapse, AddaxAI read it)"
	@echo "  camtrap-dp/                    Camtrap DP package (deployments, media, observations with individualID)"
	@echo "  decisions.csv                  zebra query photos: known / new / uncertain against demo/zebra.db"

test: install
	$(PY) -m pytest -q

# Speed and memory targets live here, never in unit tests. Each script writes bench/*.json (+ RESULTS.md).
bench: models
	$(PY) bench/bench_runtime.py --shared $(SHARED) --out bench/results.json
	$(PY) bench/bench_search.py
	$(PY) bench/bench_watch.py --shared $(SHARED)
	$(PY) bench/bench_sync.py --shared $(SHARED)
	$(PY) bench/bench_verify.py --shared $(SHARED) --out bench/verify_results.json
	$(PY) bench/bench_e2e.py --shared $(SHARED) --out bench/e2e_results.json

# Training runs (issue 5): hours of CPU; see bench/bench_train.py for the stages.
bench-train: models
	$(PY) bench/bench_train.py all --shared $(SHARED)

lint: install
	$(VENV)/bin/ruff check fieldreid tests bench

clean:
	rm -rf $(VENV) .cache demo .pytest_cache
