// Greedy decoding in llama.cpp (node-llama-cpp, CPU) of one GGUF base, bare and with each LoRA adapter GGUF.
// argv[2]: a JSON spec {package: node-llama-cpp's entry file (tools/setup_llama_cpp.sh), model, prompt: [token ids],
//                      new_tokens, runs: [{name, lora: path | null}]};
// prints one JSON line {name: {tokens, logprobs}} (natural log of each chosen token's probability; ends at EOS).
import {readFileSync} from "node:fs";
import {availableParallelism} from "node:os";
import {pathToFileURL} from "node:url";

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(spec.package).href);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: spec.model});
const results = {};
for (const run of spec.runs) {
    const context = await model.createContext({
        contextSize: 256, threads: availableParallelism(),  // node-llama-cpp's default oversubscribes: 100x slower here
        flashAttention: false,  // float32 attention and KV cache: the closest to transformers
        experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
        ...(run.lora ? {lora: {adapters: [{filePath: run.lora, scale: 1}]}} : {}),
    });
    const tokens = [], logprobs = [];
    const steps = context.getSequence().evaluateWithMetadata(spec.prompt, {confidence: true}, {temperature: 0});
    for await (const step of steps) {
        tokens.push(step.token);
        logprobs.push(Math.log(step.confidence));
        if (tokens.length >= spec.new_tokens || model.isEogToken(step.token)) break;
    }
    results[run.name] = {tokens, logprobs};
    await context.dispose();
}
console.log(JSON.stringify(results));
await model.dispose();
await llama.dispose();
