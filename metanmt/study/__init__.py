"""The MetaNMT study as one resumable command: ``metanmt study STUDY.yaml --out DIR``.

Above evaluation in the layers (data -> tasks -> engine -> adaptation -> evaluation -> study -> CLI):
a study trains its initializations (:mod:`.inits`), chooses the meta inits' inner loop
(:mod:`.inner`) and the fine-tuning length (:mod:`.rule`) on the dev language, runs every cell
through ``compare`` (:mod:`.cells`) and writes the report (:mod:`.report`, with the reference's
convergence check and forecast from :mod:`.convergence`); :mod:`.runner` orders
the tasks and runs them in processes, :mod:`.folder` keeps the study folder, :mod:`.spec` reads
the study file.
"""
