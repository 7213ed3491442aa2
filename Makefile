# One-command set-up: `make run` and `make test` create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PACKAGES := src/gen3_description src/koopman_sim src/koopman_policy src/koopman_distill src/koopman_control
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
	$(VENV)/bin/koopman-distill bench --task gen3_reach_obstacle --json results/bench_gen3.json

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
	# cd trains 32000 steps (docs/experiments.md, "Choices in make models").
	for m in $(STUDENTS); do steps=8000; if [ $$m = cd ]; then steps=32000; fi; \
		$(KD) student --method $$m --teacher models/gen3_teacher --teacher-data $(DATA)/gen3_teacher_data.h5 \
			--out models/gen3_$$m --steps $$steps || exit 1; done
	for m in teacher $(STUDENTS); do $(KD) export --checkpoint models/gen3_$$m || exit 1; done
	# OOD threshold 0.03 for closed loop (docs/experiments.md, "Choices in make models").
	for m in kdm dkoopman; do $(KD) export --checkpoint models/gen3_$$m --ood-threshold 0.03 || exit 1; done
	$(KD) eval --policies teacher,teacher_ddim10,$(shell echo $(STUDENTS) | tr ' ' ',') --episodes 100 \
		--json results/eval_gen3.json --update-cards
	# Per start state, 32 noise draws each: the fraction of each side of the pillar, against the teacher's.
	$(KD) eval --policies teacher,dkoopman,oneflow,kdm --episodes 20 --mode-states 40 --mode-draws 32 \
		--json results/modes_gen3.json
	$(KD) bench --task gen3_reach_obstacle --json results/bench_gen3.json

# Push-T (gym-pusht, state observations): the same teacher and students, trained on the scripted pusher's
# successful episodes out of 300, evaluated over 50 seeded episodes; results_table joins both tasks.
# The students distil DDIM-30 trajectories at the demonstrations' histories and at those the DDIM-10 teacher meets
# in 200 closed-loop episodes (seeds 5000-5199), 512 wide; oneflow is the teacher's U-Net started from its weights,
# then refined to its own three-call chunk (students/oneflow.py). Each choice and the runs that decided it:
# docs/experiments.md, "Push-T".
PUSHT_TEACHER_DATA := --teacher models/pusht_teacher --teacher-data $(DATA)/pusht_teacher_data.h5
PUSHT_STUDENT := $(KD) student $(PUSHT_TEACHER_DATA) --set hidden_dim=512
# $(call pusht_koopman,METHOD,OPTIONS,STEPS): the first student, its chunks finished by the teacher, the shipped one.
define pusht_koopman
$(PUSHT_STUDENT) --method $(1) $(2) --out $(DATA)/pusht_$(1)_base --steps $(3)
	$(KD) teacher-data --teacher models/pusht_teacher --data $(DATA)/pusht_demos.h5 \
		--visited $(DATA)/pusht_visited_teacher.h5 --out $(DATA)/pusht_$(1)_refined.h5 --steps 30 --draws 2 \
		--refine $(DATA)/pusht_$(1)_base --refine-progress 0.7
	$(KD) student --teacher models/pusht_teacher --teacher-data $(DATA)/pusht_$(1)_refined.h5 --set hidden_dim=512 \
		--method $(1) $(2) --out models/pusht_$(1) --steps $(3)
endef
models-pusht: setup
	mkdir -p $(DATA)
	$(VENV)/bin/koopman-sim collect --task pusht --episodes 300 --seed 0 \
		--out $(DATA)/pusht_demos.h5 --json $(DATA)/pusht_demos.json
	$(KD) teacher --data $(DATA)/pusht_demos.h5 --out models/pusht_teacher --steps 6000
	# The DDIM-10 teacher (its unrolled graph, beside the data) meets the states the students also learn at.
	$(KD) export --checkpoint models/pusht_teacher --teacher-steps 10 --out $(DATA)/pusht_teacher_ddim10.onnx
	$(KD) visit --policy $(DATA)/pusht_teacher_ddim10.onnx --backend onnx --task pusht --episodes 200 --seed 5000 \
		--out $(DATA)/pusht_visited_teacher.h5
	$(KD) teacher-data --teacher models/pusht_teacher --data $(DATA)/pusht_demos.h5 \
		--visited $(DATA)/pusht_visited_teacher.h5 --out $(DATA)/pusht_teacher_data.h5 --steps 30 --draws 2
	# Each Koopman student is trained twice: a first student learns the DDIM-30 chunks; the shipped one learns that
	# student's chunks finished by the teacher, re-noised at progress 0.7 (teacher-data --refine). kdm reads the
	# observation in its MLP encoders and head; dkoopman's encoders and head are the teacher's U-Net, started from
	# its weights; neither trains with latent noise (students/kdm.py; docs/experiments.md, "Koopman students on
	# Push-T"). On the 2-core machine: 4 + 3.5 + 4 minutes for kdm, 24 + 4 + 24 for dkoopman.
	$(call pusht_koopman,kdm,--set obs_in=all --set latent_noise=0,8000)
	$(call pusht_koopman,dkoopman,--set encoder=unet --set latent_noise=0,6000)
	for m in cd bc; do $(PUSHT_STUDENT) --method $$m --out models/pusht_$$m --steps 8000 || exit 1; done
	$(KD) student $(PUSHT_TEACHER_DATA) --method oneflow --out $(DATA)/pusht_oneflow_base --steps 16000 \
		--set backbone=unet --set terminal_loss_weight=4
	$(KD) student $(PUSHT_TEACHER_DATA) --method oneflow --init $(DATA)/pusht_oneflow_base --out models/pusht_oneflow \
		--steps 6000 --lr 3e-4 --set refine_steps=2
	$(KD) export --checkpoint models/pusht_teacher --teacher-steps 30
	for m in $(STUDENTS); do $(KD) export --checkpoint models/pusht_$$m || exit 1; done
	$(KD) eval --task pusht --policies pusht_teacher,pusht_kdm,pusht_dkoopman,pusht_oneflow,pusht_cd,pusht_bc,hold,random_target \
		--episodes 50 --json results/eval_pusht.json --update-cards
	# How closely each student reproduces the teacher's noise-to-chunk map, at histories of 10 teacher episodes on
	# seeds 2000-2009 (labelled by no training data).
	$(KD) visit --policy $(DATA)/pusht_teacher_ddim10.onnx --backend onnx --task pusht --episodes 10 --seed 2000 \
		--out $(DATA)/pusht_visited_heldout.h5
	$(KD) fidelity --teacher pusht_teacher --policies pusht_kdm,pusht_dkoopman,pusht_oneflow,pusht_cd,pusht_bc \
		--visited $(DATA)/pusht_visited_heldout.h5 --json results/fidelity_pusht.json
	# Per start state, 32 noise draws each: the face of the T the pusher touches first, against the teacher's.
	$(KD) eval --task pusht --policies pusht_dkoopman,pusht_oneflow,pusht_kdm --episodes 1 --mode-states 16 \
		--mode-draws 32 --json results/modes_pusht.json
	# The DDIM-30 teacher (its unrolled ONNX graph), the sampler whose trajectories the students distil.
	$(KD) eval --task pusht --policies pusht_teacher --backend onnx --episodes 50 \
		--json results/eval_pusht_teacher_ddim30.json
	# The teacher and the best student on 200 further seeds: how much of the 50-seed comparison is luck.
	$(KD) eval --task pusht --policies pusht_teacher,pusht_oneflow --episodes 200 --seed 2000 \
		--json results/eval_pusht_seeds2000.json
	# The DDIM-30 teacher on the same seeds: the sampler whose trajectories the students learn.
	$(KD) eval --task pusht --policies pusht_teacher --backend onnx --episodes 200 --seed 2000 \
		--json results/eval_pusht_teacher_ddim30_seeds2000.json
	# The teacher and the students on 300 seeds that no refinement was chosen on.
	$(KD) eval --task pusht --policies pusht_teacher --episodes 300 --seed 3000 \
		--json results/eval_pusht_teacher_seeds3000.json
	$(KD) eval --task pusht --policies pusht_oneflow,pusht_dkoopman,pusht_kdm --episodes 300 --seed 3000 \
		--json results/eval_pusht_seeds3000.json
	# A first Koopman student's chunk finished by the teacher from progress 0.7: what the shipped ones learn.
	$(KD) eval --task pusht --policies $(DATA)/pusht_dkoopman_base --finish-progress 0.7 --episodes 100 --seed 2000 \
		--json results/pusht_koopman_diagnosis/eval_dkoopman_finished_by_teacher_s2000.json
	$(KD) bench --task pusht --ddim-steps 30 --json results/bench_pusht.json
	$(MAKE) results-table

# The camera path: rendered 64x64 frames of the workspace camera, the image-conditioned teacher and its dkoopman
# student, through the state pipeline's commands (the dataset's frames make teacher, teacher-data and student
# train the image policies). The student's OOD threshold is set for closed loop as the state students' are
# (docs/experiments.md, "Choices in make models"). The evaluation runs both through ONNX: the teacher's DDIM-10
# graph is the sampler the student distils
# (DDPM-100 would cost 100 U-Net calls per chunk); the state student runs on the same seeds for comparison, in a
# file of its own, so that its card keeps the evaluation of `make models`.
CAM := $(DATA)/camera
models-camera: setup
	mkdir -p $(CAM)
	$(VENV)/bin/koopman-sim collect --task gen3_reach_obstacle --episodes 250 --seed 0 --camera workspace \
		--out $(CAM)/demos.h5 --json $(CAM)/collect.json
	$(KD) teacher --data $(CAM)/demos.h5 --out models/gen3_camera_teacher --steps 6000 --batch-size 64 --threads 1
	$(KD) teacher-data --teacher models/gen3_camera_teacher --data $(CAM)/demos.h5 \
		--out $(CAM)/teacher_data.h5 --steps 10 --draws 4 --batch-size 256
	$(KD) student --method dkoopman --teacher models/gen3_camera_teacher --teacher-data $(CAM)/teacher_data.h5 \
		--out models/gen3_camera_dkoopman --steps 8000 --threads 1
	for m in teacher dkoopman; do $(KD) export --checkpoint models/gen3_camera_$$m || exit 1; done
	$(KD) export --checkpoint models/gen3_camera_dkoopman --ood-threshold 0.03
	$(KD) eval --policies camera_dkoopman,camera_teacher --backend onnx --episodes 50 --seed 1000 \
		--json results/eval_camera.json --update-cards
	$(KD) eval --policies dkoopman --backend onnx --episodes 50 --seed 1000 --json results/eval_camera_state.json

# One table for both tasks (method, coverage, latency, FLOPs, speedup over the DDPM-100 teacher).
results-table: setup
	$(KD) table --results gen3_reach_obstacle results/eval_gen3.json results/bench_gen3.json \
		--results pusht results/eval_pusht.json results/bench_pusht.json --json results/results_table.json \
		--into docs/results.md

clean-venv:
	rm -rf $(VENV)
