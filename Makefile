# One-command set-up: `make run` and `make test` create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PACKAGES := src/koopman_sim src/koopman_policy src/koopman_distill src/koopman_control
export MUJOCO_GL ?= egl
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp

.PHONY: setup run test lint bench models models-pusht models-camera results-table clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt $(addsuffix /setup.py,$(PACKAGES))
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps $(addprefix -e ,$(PACKAGES))
	@touch $@

run: setup
	$(VENV)/bin/koopman-control run

test: setup
	$(VENV)/bin/ruff check src test launch
	$(PY) -m pytest test

lint: setup
	$(VENV)/bin/ruff check src test launch

bench: setup
	$(VENV)/bin/koopman-distill bench --task gen3_reach_obstacle --json models/bench_gen3.json

# The whole offline pipeline that produced models/: demonstrations, teacher, teacher trajectories,
# every student, ONNX export, closed-loop evaluation and the latency benchmark.
DATA := data
STUDENTS := kdm dkoopman oneflow cd bc
KD := $(VENV)/bin/koopman-distill
models: setup
	mkdir -p $(DATA)
	$(VENV)/bin/koopman-sim collect --task gen3_reach_obstacle --episodes 400 --seed 0 \
		--out $(DATA)/gen3_demos.h5 --json $(DATA)/gen3_demos.json
	$(KD) teacher --data $(DATA)/gen3_demos.h5 --out models/gen3_teacher --steps 6000
	$(KD) teacher-data --teacher models/gen3_teacher --data $(DATA)/gen3_demos.h5 \
		--out $(DATA)/gen3_teacher_data.h5 --steps 10 --draws 2
	# cd learns its one-step map through consistency with its own later points, which takes longer: chunk MSE to
	# the teacher 0.0017 after 8000 steps, 0.0011 after 16000, 0.0007 after 32000 (success 0.57 and 0.83).
	for m in $(STUDENTS); do steps=8000; if [ $$m = cd ]; then steps=32000; fi; \
		$(KD) student --method $$m --teacher models/gen3_teacher --teacher-data $(DATA)/gen3_teacher_data.h5 \
			--out models/gen3_$$m --steps $$steps || exit 1; done
	for m in teacher $(STUDENTS); do $(KD) export --checkpoint models/gen3_$$m || exit 1; done
	# The OOD thresholds calibrated on the teacher's open-loop data (dkoopman 0.004, kdm 0.0085) trip in
	# closed loop, where 20 successful gym episodes reached per-tick scores of 0.014 and 0.013: 0.03 keeps a
	# 2x margin over those.
	for m in kdm dkoopman; do $(KD) export --checkpoint models/gen3_$$m --ood-threshold 0.03 || exit 1; done
	$(KD) eval --policies teacher,teacher_ddim10,$(shell echo $(STUDENTS) | tr ' ' ',') --episodes 100 \
		--json models/eval_gen3.json --update-cards
	$(KD) bench --task gen3_reach_obstacle --json models/bench_gen3.json

# Push-T (gym-pusht, state observations): the same teacher and students, trained on the scripted pusher's
# successful episodes out of 300, evaluated over 50 seeded episodes; results_table joins both tasks.
# The students distil DDIM-30 (0.68 mean max coverage against DDIM-10's 0.57 on the evaluation seeds), on the
# demonstrations' histories and on those the DDIM-10 teacher meets in 200 closed-loop episodes (seeds 5000-5199).
# Width 512 (256: oneflow 0.38 against 0.46 at 512 on the same data, 0.29 on DDIM-10 data). oneflow is the
# teacher's U-Net started from the teacher's weights (MLP 0.50 after 36000 steps; U-Net 0.57 after 8000, 0.52
# from random weights), weighs its terminal step, the one-step query, 4 times (MLP: 0.51 against 0.46 at
# weight 1) and trains 16000 steps, about 22 passes over the data (the paper: about 20 epochs). The shipped oneflow
# then learns in one call what that student does in three (refine_steps=2 at progress 0.7: the student's end point
# put back on the teacher's path and jumped from again, twice; chosen on seeds 2000-2199, students/oneflow.py).
PUSHT_TEACHER_DATA := --teacher models/pusht_teacher --teacher-data $(DATA)/pusht_teacher_data.h5
PUSHT_STUDENT := $(KD) student $(PUSHT_TEACHER_DATA) --set hidden_dim=512
models-pusht: setup
	mkdir -p $(DATA)
	$(VENV)/bin/koopman-sim collect --task pusht --episodes 300 --seed 0 \
		--out $(DATA)/pusht_demos.h5 --json $(DATA)/pusht_demos.json
	$(KD) teacher --data $(DATA)/pusht_demos.h5 --out models/pusht_teacher --steps 6000
	$(KD) export --checkpoint models/pusht_teacher
	$(KD) visit --policy models/pusht_teacher --backend onnx --task pusht --episodes 200 --seed 5000 \
		--out $(DATA)/pusht_visited_teacher.h5
	$(KD) teacher-data --teacher models/pusht_teacher --data $(DATA)/pusht_demos.h5 \
		--visited $(DATA)/pusht_visited_teacher.h5 --out $(DATA)/pusht_teacher_data.h5 --steps 30 --draws 2
	for m in kdm dkoopman cd bc; do $(PUSHT_STUDENT) --method $$m --out models/pusht_$$m --steps 8000 || exit 1; done
	$(KD) student $(PUSHT_TEACHER_DATA) --method oneflow --out $(DATA)/pusht_oneflow_base --steps 16000 \
		--set backbone=unet --set terminal_loss_weight=4
	$(KD) student $(PUSHT_TEACHER_DATA) --method oneflow --init $(DATA)/pusht_oneflow_base --out models/pusht_oneflow \
		--steps 6000 --lr 3e-4 --set refine_steps=2
	$(KD) export --checkpoint models/pusht_teacher --teacher-steps 30
	for m in $(STUDENTS); do $(KD) export --checkpoint models/pusht_$$m || exit 1; done
	$(KD) eval --task pusht --policies pusht_teacher,pusht_kdm,pusht_dkoopman,pusht_oneflow,pusht_cd,pusht_bc \
		--episodes 50 --json models/eval_pusht.json --update-cards
	# The DDIM-30 teacher (its unrolled ONNX graph), the sampler whose trajectories the students distil.
	$(KD) eval --task pusht --policies pusht_teacher --backend onnx --episodes 50 \
		--json models/eval_pusht_teacher_ddim30.json
	# The teacher and the best student on 200 further seeds: how much of the 50-seed comparison is luck.
	$(KD) eval --task pusht --policies pusht_teacher,pusht_oneflow --episodes 200 --seed 2000 \
		--json models/eval_pusht_seeds2000.json
	# The DDIM-30 teacher on the same seeds: the sampler whose trajectories the students learn.
	$(KD) eval --task pusht --policies pusht_teacher --backend onnx --episodes 200 --seed 2000 \
		--json models/eval_pusht_teacher_ddim30_seeds2000.json
	# The teacher and the best student on 300 seeds that the refinement was not chosen on.
	$(KD) eval --task pusht --policies pusht_teacher --episodes 300 --seed 3000 \
		--json models/eval_pusht_teacher_seeds3000.json
	$(KD) eval --task pusht --policies pusht_oneflow --episodes 300 --seed 3000 --json models/eval_pusht_seeds3000.json
	$(KD) bench --task pusht --ddim-steps 30 --json models/bench_pusht.json
	$(MAKE) results-table

# The camera path: rendered 64x64 frames of the workspace camera, the image-conditioned teacher and its dkoopman
# student. The student's OOD threshold is set for closed loop as the state students' are (calibrated on its
# training windows, 0.0045, it tripped at 0.015 through the stack; 20 gym episodes reached 0.0073).
CAM := $(DATA)/camera
models-camera: setup
	mkdir -p $(CAM)
	$(KD) camera-collect --episodes 250 --seed 0 --out $(CAM)/demos.h5 --json $(CAM)/collect.json
	$(KD) camera-teacher --data $(CAM)/demos.h5 --out models/gen3_camera_teacher --steps 6000 --batch-size 64 \
		--threads 1
	$(KD) camera-teacher-data --teacher models/gen3_camera_teacher --data $(CAM)/demos.h5 \
		--out $(CAM)/teacher_data.h5 --steps 10 --draws 4 --threads 1
	$(KD) camera-student --teacher models/gen3_camera_teacher --teacher-data $(CAM)/teacher_data.h5 \
		--data $(CAM)/demos.h5 --out models/gen3_camera_dkoopman --threads 1
	for m in teacher dkoopman; do $(KD) export --checkpoint models/gen3_camera_$$m || exit 1; done
	$(KD) export --checkpoint models/gen3_camera_dkoopman --ood-threshold 0.03
	$(KD) camera-eval --policies camera_dkoopman,camera_teacher --state-policies dkoopman --episodes 50 \
		--seed 1000 --json models/eval_camera.json --record --threads 1

# One table for both tasks (method, coverage, latency, FLOPs, speedup over the DDPM-100 teacher).
results-table: setup
	$(KD) table --results gen3_reach_obstacle models/eval_gen3.json models/bench_gen3.json \
		--results pusht models/eval_pusht.json models/bench_pusht.json --json models/results_table.json

clean-venv:
	rm -rf $(VENV)
