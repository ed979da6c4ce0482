# Reward models: the latent reward model (LRM), its evaluation and threshold calibration; SPO's pixel model.


rule train_lrm:
    input:
        latents=f"{RES}/latents",
        base=f"{RES}/base",
    output:
        directory(f"{RES}/lrm/model"),
    log:
        f"{RES}/logs/train_lrm.log",
    benchmark:
        f"{RES}/benchmarks/train_lrm.tsv"
    params:
        cmd=stage_cmd("train_lrm"),
        section=section("lrm", "train_lrm"),
        workdir=lambda wildcards, output: os.path.dirname(output[0]),
    resources:
        **rule_resources("train_lrm"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --latents {input.latents} --base {input.base}"
        " --out {params.workdir} > {log} 2>&1"


rule eval_lrm:
    input:
        unpack(eval_lrm_inputs),
    output:
        accuracy=f"{RES}/lrm/accuracy.json",
        plot=report(
            f"{RES}/lrm/accuracy_by_t.png",
            caption="../report/lrm_accuracy.rst",
            category="Reward model",
            labels={"figure": "LRM accuracy by timestep"},
        ),
    log:
        f"{RES}/logs/eval_lrm.log",
    benchmark:
        f"{RES}/benchmarks/eval_lrm.tsv"
    params:
        cmd=stage_cmd("eval_lrm"),
        section=section("eval_lrm"),
    resources:
        **rule_resources("eval_lrm"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --model {input.model} --latents {input.latents} --data {input.data} --base {input.base}"
        " --out {output.accuracy} --plot {output.plot} > {log} 2>&1"


# The LRM and SPO's pixel model on the same test pairs, in one plot (a rule of its own, so that LPO's
# calibration never waits for the baseline's reward model).
rule eval_spm:
    input:
        unpack(eval_lrm_inputs),
        spm=f"{RES}/spm/model",
    output:
        accuracy=f"{RES}/spm/accuracy.json",
        plot=report(
            f"{RES}/spm/reward_models_by_t.png",
            caption="../report/reward_models.rst",
            category="Reward model",
            labels={"figure": "LRM vs SPO pixel model by timestep"},
        ),
    log:
        f"{RES}/logs/eval_spm.log",
    benchmark:
        f"{RES}/benchmarks/eval_spm.tsv"
    params:
        cmd=stage_cmd("eval_lrm", "eval_spm"),
        section=section("eval_lrm", "train_spm"),
    resources:
        **rule_resources("eval_spm", gpus_of="eval_lrm"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --model {input.model} --latents {input.latents} --data {input.data} --base {input.base}"
        " --spm {input.spm} --out {output.accuracy} --plot {output.plot} > {log} 2>&1"


# Optional (sibling_lrm.enabled; shapes only): the LRM fine-tuned on judged sibling pairs of LPO's own sampler.
# model/ is a subfolder, so that `lrm` inputs name an LRM folder as train_lrm's do.
rule sibling_lrm:
    input:
        base=f"{RES}/base",
        lrm=f"{RES}/lrm/model",
        world=f"{RES}/world",
    output:
        model=directory(f"{RES}/sibling_lrm/model"),
        summary=f"{RES}/sibling_lrm/sibling_lrm.json",
    log:
        f"{RES}/logs/sibling_lrm.log",
    benchmark:
        f"{RES}/benchmarks/sibling_lrm.tsv"
    params:
        cmd=stage_cmd("sibling_lrm"),
        # the sampler's fields of `optimize`, not the whole section: a change of t_min or beta must not re-run
        # ~20 minutes of rollouts
        section=section("sibling_lrm", "annotator", "world")
        + json.dumps({k: config["optimize"][k] for k in ("ddim_steps", "cfg", "eta")}, sort_keys=True),
        outdir=lambda wildcards, output: os.path.dirname(output.summary),
    resources:
        **rule_resources("sibling_lrm"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --base {input.base} --lrm {input.lrm} --world {input.world} --out {params.outdir}"
        " > {log} 2>&1"


rule calibrate:
    input:
        lrm=LPO_LRM,
        accuracy=f"{RES}/lrm/accuracy.json",
        base=f"{RES}/base",
        prompts=prompt_source,
    output:
        thresholds=f"{RES}/calibration/thresholds.json",
        plot=report(
            f"{RES}/calibration/thresholds.png",
            caption="../report/thresholds.rst",
            category="Reward model",
            labels={"figure": "Thresholds th(t) of LPO"},
        ),
    log:
        f"{RES}/logs/calibrate.log",
    benchmark:
        f"{RES}/benchmarks/calibrate.tsv"
    params:
        cmd=stage_cmd("calibrate"),
        section=section("calibrate", "optimize"),
    resources:
        **rule_resources("calibrate"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --lrm {input.lrm} --accuracy {input.accuracy} --base {input.base}"
        " --prompts {input.prompts} --out {output.thresholds} --plot {output.plot} > {log} 2>&1"


rule train_spm:
    input:
        unpack(train_spm_inputs),
    output:
        directory(f"{RES}/spm/model"),
    log:
        f"{RES}/logs/train_spm.log",
    benchmark:
        f"{RES}/benchmarks/train_spm.tsv"
    params:
        cmd=stage_cmd("train_spm"),
        section=section("train_spm"),
        workdir=lambda wildcards, output: os.path.dirname(output[0]),
    resources:
        **rule_resources("train_spm"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --latents {input.latents} --base {input.base}"
        " --out {params.workdir} > {log} 2>&1"
