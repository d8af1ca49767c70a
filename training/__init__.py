"""What the T-LoRA training scripts share, whatever the model: one `train_tlora_<family>.py` per model family
imports these pieces and writes its own training loop, as diffusers' `examples/*/train_*.py` scripts import
`diffusers.training_utils`. There is no Trainer class and there are no callbacks: a script reads top to bottom.

This package imports `pipelines.tlora`, never the reverse: the plugin stays usable without accelerate.

Modules, roughly in the order a training run uses them:

    arguments     the command-line groups every script has, and the checks that run before any model loads
    errors        InputError and HubError, and the exit codes the scripts turn them into
    images        opening an image as RGB (EXIF orientation, 16-bit, grayscale, transparency); image folders
    seeds         derived seeds: every random draw is a function of --seed and of the position in the run
    data          training images, the DreamBooth dataset, the seeded stream sampler and the data loader
    latents       VAE latents: moments, sampling, normalisation, and the latent cache
    adapter       the T-LoRA config from the flags, and attaching the trainable adapter to the denoiser
    quantization  a quantised (NF4 / int8) base: bitsandbytes layers in place of the denoiser's linears
    optim         optimizer and learning-rate schedule
    checkpoints   atomic checkpoints with rotation, resume and its checks, adapter-only training state
    validation    validation and class images, with the adapter loaded the way users load it
    card_assets   the card's pictures (rank schedule, base-vs-adapter grid, loss curve) and usage sections
    tool_exports  the files beside the adapter for other tools: loader files, ComfyUI node file, kohya LoRA
    model_card    the adapter's README.md
    hub           creating the Hub repository and uploading the result
    stopping      Ctrl-C / SIGTERM: stop after the step, save a checkpoint, exit 130
    run           the accelerator, logging, the shared seed, the inputs checked up front, the closing summary
"""
