# Preference optimisation: one rule for every method of the registry (lpo.methods.METHODS): LPO (the method),
# SPO and Diffusion-DPO (the baselines), step-level GRPO.


rule optimize:
    input:
        unpack(optimize_inputs),
    output:
        directory(f"{RES}/policy/{{method}}"),
    log:
        f"{RES}/logs/optimize_{{method}}.log",
    benchmark:
        f"{RES}/benchmarks/optimize_{{method}}.tsv"
    params:
        cmd=stage_cmd("optimize"),
        # not `calibrate`: LPO sees the calibration through its thresholds file (an input), and a calibration
        # change must not re-run SPO and Diffusion-DPO
        section=optimize_section,
        extra=lambda wildcards, input: " ".join(
            f"--{key} {input[key]}" for key in (*INPUT_KINDS, "world", "data") if key in input.keys()
        ),
        workdir=f"{RES}/optimize/{{method}}",
    resources:
        **rule_resources("optimize"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --method {wildcards.method} --base {input.base} {params.extra}"
        " --workdir {params.workdir} --out {output} > {log} 2>&1"
